"""The walk's settings chosen on one half of the images and scored on the other.

  python -m affinity_jax.benchmarks.walk_sweep --workdir=WORKDIR [--alpha=2,2.5,3]
      [--beta=24,32,48] [--dcrf_weight=2,4,6] [--out=walk_sweep.json]

On a finished workdir (its trained AffinityNet and stored CAMs), the label split's ids
are sorted and halved. Each image is embedded once; every (alpha, beta) of the grid
walks it (CAM+RW), and each dCRF weight refines the walk of the workdir's own alpha and
beta (CAM+RW+dCRF). For each half the setting with the best mIoU is chosen and scored on
the other half: a setting that wins on both halves is not fitted to its images. Prints
a table, writes JSON.
"""

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import constants
from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import workdir as workdir_lib
from affinity_jax.evaluation import confusion
from affinity_jax.inference import walk
from affinity_jax.labels import crf
from affinity_jax.ops import metrics
from affinity_jax.ops import random_walk
from affinity_jax.progress import Progress
from affinity_jax.stages import common


CANVAS = 64  # Walk grids are padded to at least 64 x 64 cells: one program for VOC.


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v)


# `ops.random_walk.propagate` with beta traced, so that every beta shares a program.
_walk = jax.jit(functools.partial(random_walk.propagate_body, group=random_walk.CPU_GROUP),
                static_argnames=("radius", "t", "border"))


def _score(cm: np.ndarray) -> float:
  """mIoU in %."""
  return 100 * float(metrics.mean_iou(cm))


def _on_canvas(x: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
  return np.pad(x, ((0, canvas[0] - x.shape[0]), (0, canvas[1] - x.shape[1]), (0, 0)))


def sweep(workdir: str, alphas, betas, dcrf_weights=()) -> dict:
  """{"halves": [ids_a, ids_b], "rw": {setting: [cm_a, cm_b]}, "dcrf": {...}}."""
  _, config = workdir_lib.saved_config(workdir)
  ctx = common.Context(config, workdir, sharding.make_mesh())
  rw, files = config.rw, ctx.files
  ids = sorted(ctx.label_ids())
  halves = (ids[:len(ids) // 2], ids[len(ids) // 2:])
  walker = ctx.walker()
  first = set(halves[0])
  settings = list(itertools.product(alphas, betas))
  empty = lambda: [np.zeros((constants.NUM_LABELS, constants.NUM_LABELS + 1), np.int64)
                   for _ in halves]
  cms = {"rw": {s: empty() for s in settings}, "dcrf": {w: empty() for w in dcrf_weights}}
  for image_id in Progress(ids, desc="walk_sweep", unit="img"):
    half = 0 if image_id in first else 1
    example = ctx.example(image_id)
    image, mask = example["image"], example["mask"]
    cams, keys = files.cams.load(image_id)
    _, (embedding,) = walker([image], [(cams, keys)], embeddings=True)
    h, w = embedding.shape[:2]
    canvas = tuple(max(CANVAS, -(-n // 16) * 16) for n in (h, w))
    valid = _on_canvas(np.ones((h, w, 1), bool), canvas)[None, ..., 0]
    features = jnp.asarray(_on_canvas(embedding, canvas)[None])
    for alpha, beta in settings:
      grid = walk.walk_input(cams, keys, alpha, (8 * h, 8 * w))
      # Channels padded to every label as well: one program whatever the classes present.
      grid = np.pad(grid, ((0, 0), (0, 0), (0, constants.NUM_LABELS - grid.shape[-1])))
      out = np.asarray(_walk(_on_canvas(grid, canvas)[None], features, radius=rw.radius,
                             beta=np.float32(beta), t=rw.t, border=rw.border, valid=valid)
                       )[0, :h, :w, :len(keys) + 1]
      scores = walk.scores_to_image(walk.normalize(out, rw.normalize), image.shape[:2])
      cms["rw"][(alpha, beta)][half] += confusion.accumulate(
          [(walk.labels(scores, keys), mask)])
      if (alpha, beta) == (rw.alpha, rw.beta):
        for weight in dcrf_weights:
          labels = crf.refine_scores(image, scores, walk.label_ids(keys), weight)
          cms["dcrf"][weight][half] += confusion.accumulate([(labels, mask)])
  return {"halves": halves, **cms}


def choose(cms: dict) -> list[dict]:
  """Per half: the setting that scores best on it, and that setting on the other half."""
  rows = []
  for tuned, other in ((0, 1), (1, 0)):
    best = max(cms, key=lambda s: _score(cms[s][tuned]))
    rows.append({"tuned_on": "AB"[tuned], "setting": best,
                 "on_tuned_half": _score(cms[best][tuned]),
                 "on_other_half": _score(cms[best][other])})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--alpha", default="2,2.5,3")
  parser.add_argument("--beta", default="24,32,48")
  parser.add_argument("--dcrf_weight", default="2,4,6")
  parser.add_argument("--out", default="walk_sweep.json")
  args = parser.parse_args(argv)
  result = sweep(args.workdir, _floats(args.alpha), _floats(args.beta),
                 _floats(args.dcrf_weight))
  score = lambda cm: round(_score(cm), 1)
  record = {"halves": [len(h) for h in result["halves"]], "ids_a": result["halves"][0]}
  for kind, name in (("rw", "alpha, beta"), ("dcrf", "dCRF weight")):
    if not result[kind]:
      continue
    print(f"| {kind} {name} | half A | half B |\n|---|--:|--:|")
    for setting, (a, b) in result[kind].items():
      print(f"| {setting} | {score(a)} | {score(b)} |")
    rows = choose(result[kind])
    for row in rows:
      print(f"tuned on {row['tuned_on']}: {row['setting']} -> {row['on_tuned_half']:.1f} there, "
            f"{row['on_other_half']:.1f} on the other half")
    record[kind] = {"grid": {str(s): [score(a), score(b)] for s, (a, b) in result[kind].items()},
                    "chosen": [{**r, "setting": str(r["setting"])} for r in rows]}
  with io.atomic_open(args.out, "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
