"""Convert a pretrained weights file into an orbax checkpoint of backbone parameters.

  python -m affinity_jax.convert --backbone=resnet38 \
      --weights=ilsvrc-cls_rna-a1_cls1000_ep-0001.params --out=weights/resnet38

The output directory holds `params/` (orbax, our parameter paths) and
`backbone.json`; configs point `load_pretrained` at it. Each array is checked
against a freshly built backbone, so a wrong file fails here, not in training.
"""

import argparse
import sys

from flax import nnx

from affinity_jax.errors import UserError
from affinity_jax.models.build import BACKBONES, build_backbone
from affinity_jax.weights import load


def convert(backbone: str, weights: str, out: str, **backbone_kw) -> load.LoadReport:
  """Reads `weights`, checks them against `backbone`, writes the checkpoint to `out`."""
  model = build_backbone(backbone, rngs=nnx.Rngs(0), **backbone_kw)
  report = load.load_pretrained(model, weights, verbose=False)
  _, arrays, _ = load.read_backbone_arrays(weights, backbone)
  load.save_backbone_checkpoint(out, backbone, arrays, weights)
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", required=True, choices=sorted(BACKBONES))
  parser.add_argument("--weights", required=True, help=".pth, .params or .h5 file")
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  kw = {"classifier": True} if args.backbone == "lite0" else {}
  try:
    report = convert(args.backbone, args.weights, args.out, **kw)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.summary())
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
