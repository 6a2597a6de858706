"""Benchmark: what one input worker process delivers, and how many a train step needs.

    python -m affinity_jax.benchmarks.inputs [--images /data/VOCdevkit/VOC2012/JPEGImages]
        [--count 64] [--crop 448] [--repeats 3] [--step-rates 5,50,200,1000]
        [--out inputs.json]

For each training pipeline (`classification`, `affinity`, `segmentation`) it runs, in
this one process as a grain worker would, what a worker does per example: decode the
stored JPEG (`sources.decode_example`) and apply the stage's own augmentation
(`data.pipeline.*Augment` at `--crop`, colour jitter on) with the stage's own loaders:
CRF marginals from a `Workdir`'s CRF store for `affinity`, a pseudo mask PNG from its
label store for `segmentation` (both written beforehand from synthetic labels of the
image's size, so their reading is timed but not their making). The JPEG bytes are read
into memory first (a worker reads local array_record files; the read is not timed).

Per pipeline it reports images/s by wall time and by this process's CPU time (user +
system): a worker is one single-threaded process, so the CPU-time rate is what it gives
on a core of its own, whatever else shares the machine; the wall rate is what it gave
here. The median of `--repeats` passes over the `--count` images.

The second table turns rates into host cores: a train step consuming R images/s needs
R / (images/s per worker) worker processes, each on its own core, plus the main
process. `--step-rates` are the step rates to convert (images/s); the ones measured in
this project are in docs/benchmarks.md.
"""

import argparse
import glob
import os
import statistics
import tempfile
import time

import numpy as np

from affinity_jax import io
from affinity_jax.benchmarks import timing
from affinity_jax.data import pipeline, sources
from affinity_jax.errors import UserError
from affinity_jax.workdir import Workdir

PIPELINES = ("classification", "affinity", "segmentation")
DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "..", "shared", "voc_dev", "VOC2012", "JPEGImages")
PRESENT = (3, 15)  # Class ids of the synthetic CRF labels (any two classes).


def raw_examples(paths: list[str]) -> list[dict]:
  """Stored examples as `sources.decode_example` reads them: JPEG bytes, no mask."""
  out = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    out.append({"image": data, "mask": b"", "labels": np.eye(20, dtype=np.uint8)[2],
                "id": os.path.splitext(os.path.basename(path))[0], "height": 0, "width": 0})
  return out


def write_labels(files: Workdir, examples: list[dict]) -> None:
  """CRF marginals (background + `PRESENT`) and a pseudo mask per image, of its size."""
  rng = np.random.default_rng(0)
  keys = np.array((0,) + PRESENT, np.int32)
  for raw in examples:
    h, w = sources.decode_example(raw)["image"].shape[:2]
    logits = rng.normal(size=(h // 8 + 1, w // 8 + 1, len(keys))).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p = np.repeat(np.repeat(p, 8, 0), 8, 1)[:h, :w]  # Smooth at the CRF's 1/8 scale.
    files.crf.save(raw["id"], p, p[..., ::-1], keys)
    files.rw.save(raw["id"], keys[np.argmax(p, -1)].astype(np.uint8))


def transforms_for(files: Workdir, crop: int) -> dict:
  """Each pipeline's augmentation with the loaders its stage passes."""
  return {
      "classification": pipeline.ClassificationAugment(crop_size=crop),
      "affinity": pipeline.AffinityAugment(crf_loader=files.crf.load, crop_size=crop),
      "segmentation": pipeline.SegmentationAugment(mask_loader=files.rw.load, crop_size=crop),
  }


def time_worker(transform, examples: list[dict], repeats: int) -> tuple[float, float]:
  """Median (wall, CPU) seconds of decoding + augmenting every example once."""
  walls, cpus = [], []
  for r in range(max(1, repeats)):
    rng = np.random.default_rng(r)
    c0, t0 = timing.cpu_seconds(), time.perf_counter()
    for raw in examples:
      transform.random_map(sources.decode_example(raw), rng)
    walls.append(time.perf_counter() - t0)
    cpus.append(timing.cpu_seconds() - c0)
  return statistics.median(walls), statistics.median(cpus)


def workers_needed(step_rate: float, worker_rate: float) -> int:
  """Worker processes (one core each) that feed a step of `step_rate` images/s."""
  return int(np.ceil(step_rate / worker_rate))


def run(paths: list[str], crop: int, repeats: int, pipelines=PIPELINES) -> list[dict]:
  """One row per pipeline: images/s per worker by wall and CPU time."""
  examples = raw_examples(paths)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    files = Workdir(tmp)
    os.makedirs(files.crf.directory, exist_ok=True)
    os.makedirs(files.rw.directory, exist_ok=True)
    write_labels(files, examples)
    made = transforms_for(files, crop)
    for name in pipelines:
      time_worker(made[name], examples[:2], 1)  # Imports and first-call costs.
      wall, cpu = time_worker(made[name], examples, repeats)
      n = len(examples)
      rows.append(dict(pipeline=name, crop=crop, images=n,
                       images_per_s_wall=n / wall, images_per_s_cpu=n / cpu,
                       ms_per_image_wall=1e3 * wall / n, ms_per_image_cpu=1e3 * cpu / n))
  return rows


def core_table(rows: list[dict], step_rates: list[float]) -> list[dict]:
  """Workers (and cores with the main process) each step rate needs, per pipeline."""
  table = []
  for rate in step_rates:
    for r in rows:
      workers = workers_needed(rate, r["images_per_s_cpu"])
      table.append(dict(pipeline=r["pipeline"], step_images_per_s=rate, workers=workers,
                        cores=workers + 1))
  return table


def _print(rows, cores, info):
  print(f"decode + augmentation, one process, {info['host']}; median of passes")
  print(f"{'pipeline':<15} {'crop':>5} {'images':>6} {'img/s (CPU)':>12} {'img/s (wall)':>13} "
        f"{'ms/img (CPU)':>13}")
  for r in rows:
    print(f"{r['pipeline']:<15} {r['crop']:>5} {r['images']:>6} {r['images_per_s_cpu']:>12.1f} "
          f"{r['images_per_s_wall']:>13.1f} {r['ms_per_image_cpu']:>13.1f}")
  print("\nworkers = ceil(step images/s / worker images/s (CPU)); cores = workers + 1 (main)")
  print(f"{'pipeline':<15} {'step img/s':>10} {'workers':>8} {'cores':>6}")
  for c in cores:
    print(f"{c['pipeline']:<15} {c['step_images_per_s']:>10g} {c['workers']:>8} "
          f"{c['cores']:>6}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", default=DEFAULT_IMAGES, help="folder of JPEGs (VOC's JPEGImages)")
  p.add_argument("--count", type=int, default=64, help="images per pass")
  p.add_argument("--crop", type=int, default=448)
  p.add_argument("--pipelines", default=",".join(PIPELINES))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--step-rates", default="5,50,200,1000",
                 help="comma list of train-step images/s to convert into cores")
  p.add_argument("--out", default="inputs.json")
  a = p.parse_args(argv)
  paths = sorted(glob.glob(os.path.join(a.images, "*.jpg")))[:a.count]
  if not paths:
    raise UserError(f"--images: no .jpg files in {a.images}")
  names = [s for s in a.pipelines.split(",") if s]
  if set(names) - set(PIPELINES):
    raise UserError(f"--pipelines: unknown {sorted(set(names) - set(PIPELINES))}; "
                    f"choose from {','.join(PIPELINES)}")
  rates = [float(s) for s in a.step_rates.split(",") if s]
  rows = run(paths, a.crop, a.repeats, names)
  cores = core_table(rows, rates)
  info = dict(host=timing.cpu_name(), cpus=pipeline.available_cpus(),
              default_workers=pipeline.default_worker_count())
  _print(rows, cores, info)
  io.write_json(a.out, dict(info, images_dir=os.path.abspath(a.images), repeats=a.repeats,
                            rows=rows, cores=cores))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
