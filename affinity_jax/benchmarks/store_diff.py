"""How far two workdirs' stored CAMs and pseudo masks are apart, image by image.

  python -m affinity_jax.benchmarks.store_diff WORKDIR_A WORKDIR_B [--edge=32]
      [--out=store_diff.json]

For the images both hold: the largest and the mean absolute difference of the stored
CAMs (float16 in [0, 1], over each image's own pixels), the same near the bottom and
right edges (the last `--edge` rows and columns, where inference's padding differs
between canvases and tight padding) and elsewhere, and the share of pixels on which the
CAM+RW (`rw/`) and CAM+RW+dCRF (`rw_crf/`) labels agree. Prints a table, writes JSON.
"""

import argparse
import os

import numpy as np

from affinity_jax import io
from affinity_jax import workdir as workdir_lib
from affinity_jax.errors import UserError


def compare(a: str, b: str, edge: int = 32) -> dict:
  """The differences of workdirs a and b (see the module docstring)."""
  wa, wb = workdir_lib.Workdir(a), workdir_lib.Workdir(b)
  ids = sorted(set(_ids(wa.cams)) & set(_ids(wb.cams)))
  if not ids:
    raise UserError(f"{a} and {b} hold no CAMs of the same images")
  max_abs, sums, counts = 0.0, dict(all=0.0, edge=0.0, inner=0.0), dict(all=0, edge=0, inner=0)
  per_image = []
  for image_id in ids:
    (ca, ka), (cb, kb) = wa.cams.load(image_id), wb.cams.load(image_id)
    if not np.array_equal(ka, kb) or ca.shape != cb.shape:
      raise UserError(f"{image_id}: the two workdirs stored different classes or sizes")
    diff = np.abs(ca - cb).max(axis=-1)             # [H, W], over the present classes.
    near = np.zeros(diff.shape, bool)
    near[-edge:], near[:, -edge:] = True, True
    for name, mask in (("all", np.ones_like(near)), ("edge", near), ("inner", ~near)):
      sums[name] += float(diff[mask].sum())
      counts[name] += int(mask.sum())
    max_abs = max(max_abs, float(diff.max()))
    per_image.append(float(diff.max()))
  out = dict(images=len(ids), edge=edge, cam_max_abs=max_abs,
             cam_mean_abs={k: sums[k] / max(counts[k], 1) for k in sums},
             cam_image_max_median=float(np.median(per_image)))
  for folder in ("rw", "rw_crf"):
    sa, sb = workdir_lib.LabelStore(a, folder), workdir_lib.LabelStore(b, folder)
    both = [i for i in ids if sa.exists(i) and sb.exists(i)]
    if both:
      same = [np.mean(sa.load(i) == sb.load(i)) for i in both]
      out[f"{folder}_pixels_equal"] = float(np.mean(same))
      out[f"{folder}_images_equal"] = int(sum(s == 1.0 for s in same))
  return out


def _ids(store) -> list[str]:
  if not os.path.isdir(store.directory):
    return []
  return [name[:-len(store.suffix)] for name in os.listdir(store.directory)
          if name.endswith(store.suffix)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("a")
  p.add_argument("b")
  p.add_argument("--edge", type=int, default=32, help="edge band width in pixels")
  p.add_argument("--out", default="store_diff.json")
  args = p.parse_args(argv)
  out = compare(args.a, args.b, args.edge)
  mean = out["cam_mean_abs"]
  print(f"{out['images']} images; CAM |a - b|: max {out['cam_max_abs']:.4f}, mean "
        f"{mean['all']:.5f} (last {args.edge} rows/cols {mean['edge']:.5f}, elsewhere "
        f"{mean['inner']:.5f}); median of per-image max {out['cam_image_max_median']:.4f}")
  for folder in ("rw", "rw_crf"):
    if f"{folder}_pixels_equal" in out:
      print(f"{folder}: {out[f'{folder}_pixels_equal']:.2%} of pixels equal, "
            f"{out[f'{folder}_images_equal']} of {out['images']} images identical")
  io.write_json(args.out, out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
