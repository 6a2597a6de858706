"""Command line: prepare a dataset as array_record files under an explicit data_dir.

  python -m affinity_jax.data.prepare --dataset=voc12 --manual_dir=/path/VOCdevkit --data_dir=/path/data
  python -m affinity_jax.data.prepare --dataset=scenes --data_dir=/path/data [--image_size=96 ...]
"""

import argparse
import sys

from affinity_jax.data import sources
from affinity_jax.errors import UserError

_SCENE_FLAGS = ("image_size", "num_classes", "max_objects", "num_train", "num_val", "seed")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m affinity_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=sources.DATASETS)
  p.add_argument("--data_dir", required=True, help="where prepared datasets are written")
  p.add_argument("--manual_dir", help="voc12: the VOCdevkit (or VOCdevkit/VOC2012) folder")
  for name in _SCENE_FLAGS:
    p.add_argument(f"--{name}", type=int, help="scenes only (default: ScenesConfig's)")
  args = p.parse_args(argv)
  params = {k: getattr(args, k) for k in _SCENE_FLAGS if getattr(args, k) is not None}
  try:
    if params and args.dataset != "scenes":
      raise UserError(f"--{next(iter(params))}: only applies to --dataset=scenes")
    builder = sources.prepare(args.dataset, args.data_dir, args.manual_dir,
                              manual_flag="--manual_dir", **params)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"prepared {args.dataset} in {builder.data_dir}: {splits}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
