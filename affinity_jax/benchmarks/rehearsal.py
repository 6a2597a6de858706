"""Rehearsal of the paper's full-size run: every stage on a sample, compilation included,
projected to the wall time of the whole train_aug pipeline on this machine.

  python -m affinity_jax.benchmarks.rehearsal [--backbone=resnet38] [--images=N]
      [--steps=N] [--crf-images=N] [--train-batch=B] [--crop=448] [--workers=-1]
      [--seed=0] [--out=rehearsal.json]

Inputs are synthetic photo-like images (`pipeline.synthetic_image`) at sizes drawn with
`--seed` from VOC 2012's size distribution (`voc_sizes.SIZES`), so every inference
canvas of `data.infer_canvases` is met. Each stage runs the code the pipeline runs,
with `defaults.base_config()` and random weights (speed does not depend on them):
  - train_cam / train_aff / train_seg: `training.loop.make_train_step` (donated state,
    data-sharded over all devices) fed by the real grain input pipeline
    (`data.pipeline.*_batches`, the config's crop, `data.num_workers` workers) over an
    in-memory source of JPEG-encoded images, decoded in `__getitem__`; CRF marginals and
    pseudo masks come from a workdir's stores (synthetic labels of each image's size).
    One warm-up step, then `--steps` timed steps.
  - infer_cam: `inference.cam.Classifier.cams` (the config's scales, canvases and
    `cam.infer_batch`), images grouped by canvas as the stage groups them, CAMs stored.
  - aff_labels: `labels.crf.run_pool` (two CRFs per image) in `crf.num_workers`
    processes over `--crf-images` images.
  - infer_rw: `inference.walk.Walker` in batches of `rw.batch_size` per canvas, labels
    stored, and the dense CRF of the walk's scores in `crf.num_workers` processes
    alongside the walk (`crf.map_jobs`), as the stage runs them.
  - eval_seg: `inference.segment.predictor` (single scale, canvases) on val images.
Inference stages first process one image per canvas (the compiles), then every image.

Measured, per stage: the steady rate (images/s; training: the timed steps end to end;
pools: from the first round of results to the last), XLA programs compiled and their
seconds (`compilation.Compiles`, model construction excluded), the host time the device
waits for (training: time blocked in the input pipeline's `next()` as a fraction of the
steps' wall time; aff_labels: the CRF pool's rate as a multiple of infer_cam's rate;
infer_rw: the fraction of the stage's wall time the walk is idle, waiting for the dCRF
pool), peak device memory (`memory_stats`, "n/a" where the backend has none) and peak
host memory (max RSS of this process and of its largest child), both peaks since start;
Linux keeps a child's max RSS across the exec that starts a 'spawn' worker, so the
child's figure is at most what this process held when it started one (an upper bound).
Projected: each stage's minutes on the full pipeline, compile seconds + work / steady
rate, with work = steps x batch of the defaults for training, 10,582 train_aug images
for infer_cam, aff_labels and infer_rw, 1,449 val images for eval_seg; and their total.
Prints a table and writes JSON.
"""

import argparse
import collections
import functools
import gc
import io as bytes_io
import os
import resource
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image

from affinity_jax import compilation
from affinity_jax import defaults
from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import workdir
from affinity_jax.benchmarks import inputs
from affinity_jax.benchmarks import pipeline as bench
from affinity_jax.benchmarks import timing
from affinity_jax.benchmarks import voc_sizes
from affinity_jax.data import pipeline as data_pipeline
from affinity_jax.data import sources
from affinity_jax.inference import cam as cam_inference
from affinity_jax.inference import canvas as canvas_lib
from affinity_jax.inference import segment
from affinity_jax.inference import walk
from affinity_jax.labels import crf
from affinity_jax.models import heads
from affinity_jax.stages import common

STAGES = ("train_cam", "infer_cam", "aff_labels", "train_aff", "infer_rw", "train_seg",
          "eval_seg")
VAL = 1_449  # Images of VOC 2012 val: the segmentation net's evaluation.
# Sample sizes: small on a CPU; on an accelerator sized for ResNet-38 on one H100.
CPU_COUNTS = dict(images=16, steps=3, crf_images=6)
ACCEL_COUNTS = dict(images=48, steps=10, crf_images=8)


# Inputs ------------------------------------------------------------------------------


def draw_sizes(n: int, seed: int, canvases: canvas_lib.Canvases) -> list[tuple[int, int]]:
  """n (height, width) drawn from `voc_sizes.SIZES` by their counts.

  The last draws are replaced, where needed, by the most common size of each canvas that
  the table uses and the draw missed, so that every canvas is met (n permitting).
  """
  table = np.asarray(voc_sizes.SIZES)
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(table), size=n, p=table[:, 2] / table[:, 2].sum())
  sizes = [tuple(int(v) for v in table[i, :2]) for i in picks]
  wanted = {}   # Canvas -> its most common size (the table is most common first).
  for h, w, _ in voc_sizes.SIZES:
    wanted.setdefault(canvases.canvas(h, w), (h, w))
  missing = [s for c, s in wanted.items() if c not in {canvases.canvas(*s) for s in sizes}]
  for i, size in enumerate(missing[:n]):
    sizes[n - 1 - i] = size
  return sizes


class JpegSource:
  """A grain random-access source of JPEG-encoded synthetic images, decoded on access.

  Picklable (it holds the encoded bytes), so grain workers decode as they would read a
  prepared split. Examples are those of `sources.decode_example`.

  Args:
    sizes: (height, width) of each image.
    seed: seed of the first image's content (image i uses seed + i).
  """

  def __init__(self, sizes: list[tuple[int, int]], seed: int = 0):
    self.raw = []
    for i, (h, w) in enumerate(sizes):
      buf = bytes_io.BytesIO()
      Image.fromarray(bench.synthetic_image(h, w, seed + i)).save(buf, "JPEG", quality=90)
      self.raw.append(dict(image=buf.getvalue(), mask=b"", labels=bench._labels20(),
                           id=f"img{i:05d}", height=h, width=w))

  def __len__(self) -> int:
    return len(self.raw)

  def __getitem__(self, index: int) -> dict:
    return sources.decode_example(self.raw[int(index)])

  def __repr__(self) -> str:
    return f"JpegSource({len(self)} images)"


# Measurements ------------------------------------------------------------------------


def peak_memory() -> dict:
  """Peaks since the process started: device MB (None where the backend has no
  `memory_stats`), host max RSS MB of this process and of its largest child."""
  stats = jax.local_devices()[0].memory_stats() or {}
  device = stats.get("peak_bytes_in_use")
  kb = lambda who: resource.getrusage(who).ru_maxrss / 1024   # Linux: KiB.
  return dict(peak_device_mb=None if device is None else device / 2**20,
              peak_host_mb=kb(resource.RUSAGE_SELF),
              peak_child_mb=kb(resource.RUSAGE_CHILDREN))


def steady_rate(stamps: list[float], workers: int) -> float | None:
  """Images/s of a pool from its results' times, after its first round of `workers`
  results (start-up excluded); None with too few results."""
  k = min(max(1, workers), len(stamps) - 1)
  if k < 1 or stamps[-1] <= stamps[k - 1]:
    return None
  return (len(stamps) - k) / (stamps[-1] - stamps[k - 1])


def warm_then_time(process, items: list, key) -> float:
  """Calls `process(items)` on the first item of each `key` (the compiles), then on
  every item; returns the wall seconds of the second call."""
  firsts = list({key(item): item for item in reversed(items)}.values())
  process(firsts)
  t0 = time.perf_counter()
  process(items)
  return time.perf_counter() - t0


def _row(stage, images, batch, rate, compiles, work, host_wait=None, host_note="",
         extra_s=0.0):
  fixed = compiles.seconds + extra_s
  return dict(stage=stage, images=images, batch=batch, images_per_s=rate,
              programs=compiles.count, compile_s=compiles.seconds,
              programs_by_name=dict(compiles.by_name), host_wait=host_wait,
              host_note=host_note, work_images=work,
              projected_min=(fixed + work / rate) / 60, **peak_memory())


# Stages ------------------------------------------------------------------------------


def rehearse_train(kind: str, backbone: str, source: JpegSource, files: workdir.Workdir,
                   mesh, batch: int, crop: int, steps: int, workers: int) -> dict:
  """The train step of network `kind` fed by its real input pipeline."""
  base = defaults.base_config()
  c = base[kind]
  step, _, norm = bench.make_trainer(kind, bench.loss_functions(base)[kind], backbone, mesh)
  common_kw = dict(mesh=mesh, batch_size=batch, seed=base.seed, crop_size=crop,
                   normalization=norm, jitter=base.data.color_jitter, worker_count=workers)
  if kind == "cam":
    batches = data_pipeline.classification_batches(
        source, long_side=tuple(c.resize_long), **common_kw)
  elif kind == "aff":
    batches = data_pipeline.affinity_batches(source, files.crf.load, **common_kw)
  else:
    batches = data_pipeline.segmentation_batches(source, files.rw.load,
                                                 long_side=tuple(c.resize_long), **common_kw)
  with compilation.Compiles() as compiles:
    jax.block_until_ready(step(next(batches)))   # Compile and worker start-up.
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
      t = time.perf_counter()
      data = next(batches)
      waited += time.perf_counter() - t
      loss = step(data)
    loss = float(loss)
    wall = time.perf_counter() - t0
  if not np.isfinite(loss):
    raise FloatingPointError(f"train_{kind}: loss {loss}")
  used = batches.worker_count
  del batches   # Ends the grain workers.
  gc.collect()
  return _row(f"train_{kind}", steps * batch, batch, steps * batch / wall, compiles,
              c.train.steps * c.batch_size, waited / wall,
              f"{waited / wall:.0%} of the step in next() ({used} grain workers)")


def rehearse_infer_cam(backbone: str, images: list[np.ndarray], mesh, out_dir: str) -> dict:
  """`Classifier.cams` over the images grouped by canvas, CAMs stored."""
  base = defaults.base_config()
  canvases = canvas_lib.Canvases.from_config(base.data)
  classifier = cam_inference.Classifier(heads.CAMNet(backbone, rngs=nnx.Rngs(0)),
                                        base.cam.scales, canvases, base.cam.infer_batch, mesh)
  store = workdir.CamStore(out_dir)
  labels = bench._labels20()
  keys = np.flatnonzero(labels) + 1
  canvas_of = lambda item: canvases.canvas(*item[1].shape[:2])

  def process(items):
    for chunk in common.grouped_batches(items, canvas_of, base.cam.infer_batch):
      examples = [dict(image=image, labels=labels) for _, image in chunk]
      for (i, _), cams in zip(chunk, classifier.cams(examples)):
        store.save(f"img{i:05d}", cams[..., keys - 1], keys)

  with compilation.Compiles() as compiles:
    wall = warm_then_time(process, list(enumerate(images)), canvas_of)
  used = len({canvases.canvas(*im.shape[:2]) for im in images})
  row = _row("infer_cam", len(images), base.cam.infer_batch, len(images) / wall, compiles,
             bench.TRAIN_AUG)
  return dict(row, canvases_used=used, scales=len(base.cam.scales))


def rehearse_aff_labels(images: list[np.ndarray], cams: list[np.ndarray], out_dir: str,
                        cam_rate: float) -> dict:
  """`crf.run_pool` with the config's workers; its rate against infer_cam's."""
  base = defaults.base_config()
  workers = base.crf.num_workers
  ids = [f"img{i:05d}" for i in range(len(images))]
  keys = np.asarray(bench.PRESENT)
  stamps = []
  t0 = time.perf_counter()
  with compilation.Compiles() as compiles:
    crf.run_pool(ids, lambda i: (images[int(i[3:])], cams[int(i[3:])], keys), out_dir,
                 workers=workers, la_alpha=base.crf.la_alpha, ha_alpha=base.crf.ha_alpha,
                 progress=False, done=lambda _: stamps.append(time.perf_counter()))
  wall = time.perf_counter() - t0
  rate = steady_rate(stamps, workers) or len(images) / wall
  return _row("aff_labels", len(images), 1, rate, compiles, bench.TRAIN_AUG,
              rate / cam_rate, f"pool {rate / cam_rate:.2f}x infer_cam's rate "
              f"({workers} processes)", extra_s=stamps[0] - t0 if stamps else 0.0)


def rehearse_infer_rw(backbone: str, images: list[np.ndarray], cams: list[np.ndarray],
                      mesh, out_dir: str) -> dict:
  """`Walker` in batches per canvas, labels stored, the dCRF pool alongside."""
  base = defaults.base_config()
  rw = base.rw
  canvases = canvas_lib.Canvases.from_config(base.data)
  walker = walk.Walker(heads.AffinityNet(backbone, rngs=nnx.Rngs(0)), rw, canvases, mesh)
  keys = np.asarray(bench.PRESENT)
  canvas_of = lambda item: canvases.canvas(*item[1].shape[:2])
  walking, stamps = [0.0], []

  def walked(items):
    for chunk in common.grouped_batches(items, canvas_of, rw.batch_size):
      t = time.perf_counter()
      scores = walker([image for _, image in chunk], [(cams[i], keys) for i, _ in chunk])
      walking[0] += time.perf_counter() - t
      for (i, image), s in zip(chunk, scores):
        io.save_label_png(os.path.join(out_dir, f"rw{i:05d}.png"), walk.labels(s, keys))
        yield os.path.join(out_dir, f"crf{i:05d}.png"), image, s, walk.label_ids(keys)

  def process(items):
    walking[0] = 0.0
    stamps.clear()
    if rw.dcrf:
      work = functools.partial(crf.label_png, unary_weight=rw.dcrf_unary_weight)
      crf.map_jobs(work, walked(items), base.crf.num_workers,
                   lambda _: stamps.append(time.perf_counter()))
    else:
      collections.deque(walked(items), maxlen=0)

  with compilation.Compiles() as compiles:
    wall = warm_then_time(process, list(enumerate(images)), canvas_of)
  rate = (steady_rate(stamps, base.crf.num_workers) if rw.dcrf else None) \
      or len(images) / wall
  idle = 1 - walking[0] / wall
  return _row("infer_rw", len(images), walker.batch_size, rate, compiles, bench.TRAIN_AUG,
              idle, f"walk idle {idle:.0%} of the stage (dCRF in "
              f"{base.crf.num_workers} processes)" if rw.dcrf else "no dCRF")


def rehearse_eval_seg(backbone: str, images: list[np.ndarray]) -> dict:
  """`segment.predictor` on every image (single scale, canvases)."""
  base = defaults.base_config()
  canvases = canvas_lib.Canvases.from_config(base.data)
  predict = segment.predictor(
      heads.SegNet(backbone, rngs=nnx.Rngs(0), dilation=base.seg.head_dilation,
                   width=base.seg.head_width), canvases)
  with compilation.Compiles() as compiles:
    wall = warm_then_time(lambda items: [predict(im) for im in items], images,
                          lambda im: canvases.canvas(*im.shape[:2]))
  return _row("eval_seg", len(images), 1, len(images) / wall, compiles, VAL)


# Report ------------------------------------------------------------------------------


def _mb(value) -> str:
  return "n/a" if value is None else f"{value:,.0f}"


def print_table(rows: list[dict], total_min: float) -> None:
  print(f"\n{'stage':<11} {'img/s':>8} {'programs':>8} {'compile s':>9} {'host wait':>9} "
        f"{'dev MB':>7} {'host MB':>13} {'work':>8} {'proj. min':>9}  host wait is")
  for r in rows:
    wait = "" if r["host_wait"] is None else (
        f"{r['host_wait']:.2f}x" if r["stage"] == "aff_labels" else f"{r['host_wait']:.0%}")
    host = f"{r['peak_host_mb']:,.0f}+{r['peak_child_mb']:,.0f}"
    print(f"{r['stage']:<11} {r['images_per_s']:>8.2f} {r['programs']:>8} "
          f"{r['compile_s']:>9.1f} {wait:>9} {_mb(r['peak_device_mb']):>7} {host:>13} "
          f"{r['work_images']:>8,} {r['projected_min']:>9.1f}  {r['host_note']}")
  print(f"projected total: {total_min:,.0f} min = {total_min / 60:.1f} h")
  print("measured: img/s, programs, compile s, host wait, peak MB (host: this process + "
        "its largest child, an upper bound; peaks since start); projected: proj. min = "
        "compile s + work / "
        "img/s (work: train = steps x batch of the defaults; 10,582 train_aug images; "
        "1,449 val)")


def main(argv=None):
  on_cpu = jax.devices()[0].platform == "cpu"
  counts = CPU_COUNTS if on_cpu else ACCEL_COUNTS
  base = defaults.base_config()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backbone", default="tiny" if on_cpu else base.model.backbone,
                 help="resnet38 | vgg16 | lite0 | tiny (default tiny on CPU, else the "
                      "config's)")
  p.add_argument("--images", type=int, default=counts["images"],
                 help=f"images per inference stage (default {CPU_COUNTS['images']} on CPU, "
                      f"{ACCEL_COUNTS['images']} otherwise)")
  p.add_argument("--steps", type=int, default=counts["steps"],
                 help="timed steps per training stage, after one warm-up step")
  p.add_argument("--crf-images", type=int, default=counts["crf_images"],
                 help="images of the aff_labels CRF pool")
  p.add_argument("--train-batch", type=int, default=0,
                 help="training batch (default: the config's; on CPU 2, rounded up to a "
                      "multiple of the devices)")
  p.add_argument("--crop", type=int, default=0, help="training crop (default the config's)")
  p.add_argument("--workers", type=int, default=base.data.num_workers,
                 help="grain workers (default data.num_workers; -1: one per core less one)")
  p.add_argument("--seed", type=int, default=0, help="draw of sizes and image content")
  p.add_argument("--out", default="rehearsal.json")
  a = p.parse_args(argv)

  mesh = sharding.make_mesh()
  local_mesh = sharding.make_mesh(jax.local_devices())
  canvases = canvas_lib.Canvases.from_config(base.data)
  sizes = draw_sizes(a.images, a.seed, canvases)
  images = [bench.synthetic_image(h, w, a.seed + i) for i, (h, w) in enumerate(sizes)]
  cams = [bench.synthetic_cams(h, w, len(bench.PRESENT), a.seed + i)
          for i, (h, w) in enumerate(sizes)]
  info = timing.device_info()
  print(f"rehearsal: backbone {a.backbone} on {info['devices']} x {info['device']} "
        f"({info['host']}), jax {info['jax']}; {a.images} images drawn from VOC's sizes "
        f"(seed {a.seed}), {a.steps} steps per training stage; compile included",
        flush=True)
  rows = []
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    files = workdir.Workdir(tmp)
    os.makedirs(files.crf.directory, exist_ok=True)
    os.makedirs(files.rw.directory, exist_ok=True)

    def batch_of(kind):
      if a.train_batch:
        return a.train_batch
      b = bench.CPU_BATCH if on_cpu else base[kind].batch_size
      return -(-b // mesh.size) * mesh.size

    source = JpegSource(draw_sizes(max(16, 2 * max(map(batch_of, ("cam", "aff", "seg")))),
                                   a.seed + 1, canvases), a.seed + 1000)
    inputs.write_labels(files, source.raw)
    for stage in STAGES:
      if stage.startswith("train_"):
        kind = stage[len("train_"):]
        row = rehearse_train(kind, a.backbone, source, files, mesh, batch_of(kind),
                             a.crop or base[kind].crop, a.steps, a.workers)
      elif stage == "infer_cam":
        row = rehearse_infer_cam(a.backbone, images, local_mesh,
                                 os.path.join(tmp, "cams"))
      elif stage == "aff_labels":
        n = max(a.crf_images, base.crf.num_workers + 1)
        row = rehearse_aff_labels(images[:n], cams[:n], os.path.join(tmp, "crf_pool"),
                                  rows[-1]["images_per_s"])
      elif stage == "infer_rw":
        out_dir = os.path.join(tmp, "rw_out")
        os.makedirs(out_dir, exist_ok=True)
        row = rehearse_infer_rw(a.backbone, images, cams, local_mesh, out_dir)
      else:
        row = rehearse_eval_seg(a.backbone, images)
      print(f"  {stage}: {row['images_per_s']:.2f} img/s, {row['programs']} programs in "
            f"{row['compile_s']:.1f} s, projected {row['projected_min']:,.1f} min",
            flush=True)
      rows.append(row)
  total = sum(r["projected_min"] for r in rows)
  print_table(rows, total)
  io.write_json(a.out, dict(
      info, backbone=a.backbone, seed=a.seed, sizes=sizes, steps=a.steps,
      crf_images=a.crf_images, canvases=[list(c) for c in canvases.sizes],
      rehearsal_s=time.perf_counter() - t_start, rows=rows, projected_total_min=total,
      measured=["images_per_s", "programs", "compile_s", "host_wait", "peak_device_mb",
                "peak_host_mb", "peak_child_mb"],
      projected=["projected_min", "projected_total_min"]))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
