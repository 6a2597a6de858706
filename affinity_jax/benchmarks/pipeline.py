"""Throughput (images/s) of every pipeline stage at VOC sizes, on synthetic inputs.

  python -m affinity_jax.benchmarks.pipeline [--backbone=lite0] [--out=pipeline.json]
      [--stages=train_cam,infer_cam,crf,train_aff,infer_rw,train_seg]
      [--cam-batch=16 --aff-batch=8 --seg-batch=16 --rw-batch=4] [--crf-workers=2]

Each stage runs the code the pipeline runs, on random inputs of the spec's sizes:
  - train_cam / train_aff / train_seg: `training.loop.make_train_step` (jitted, donated
    state, data-sharded batch over all devices) with the stage's loss function and the
    real optimiser (parameter groups, poly schedule, momentum) of `defaults.base_config()`,
    on `--crop`^2 crops (448). Random initial weights (speed does not depend on them).
  - infer_cam: what the stage does with one `--image` (375x500) image:
    `inference.cam.multiscale_cams` (host resizing, the 8 passes as 4 forward calls of
    2 on the image's canvas `data.infer_canvases`, the host merge) and the npz stored; and,
    timed alternately with it, the same 4 forward calls alone (the ratio is printed).
  - crf: `labels.crf.crf_low_high` (two CRFs, 2 classes + background) on one image in
    this process; then `crf.run_pool` with `--crf-workers` processes over
    `--crf-images` images (process start-up included, store files written to a temp dir).
  - infer_rw: the stage's jitted AffinityNet forward + `random_walk.propagate` (radius,
    beta, t, border of the config), inputs padded onto the image's canvas with a
    `valid` mask, batch 1 and `--rw-batch`; and the dense CRF that the stage runs on
    the walk's scores (`rw.dcrf`), one image in this process (the stage runs them in
    `crf.num_workers` processes while the next batches walk).
Times exclude compilation (reported separately): median of `--repeats` calls after one
warm-up call, each waited for with `block_until_ready`. The summary multiplies each
stage's rate by its work on train_aug (10,582 images; training images = steps x batch
of the config) and names the bottleneck. Prints tables and writes JSON.
"""

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import defaults
from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import workdir
from affinity_jax.benchmarks import timing
from affinity_jax.data import pipeline
from affinity_jax.data import transforms
from affinity_jax.errors import UserError
from affinity_jax.inference import STRIDE
from affinity_jax.inference import cam as cam_inference
from affinity_jax.inference import canvas as canvas_lib
from affinity_jax.inference import walk as walk_inference
from affinity_jax.labels import crf
from affinity_jax.models import heads
from affinity_jax.training import losses
from affinity_jax.training import optim

STAGES = ("train_cam", "infer_cam", "crf", "train_aff", "infer_rw", "train_seg")
TRAIN_AUG = 10_582  # Images of VOC 2012 train_aug: CAMs, CRF labels, walks.
# Spec batch sizes on an accelerator; on a CPU the defaults are small (see --help).
ACCEL_BATCH = dict(cam=16, aff=8, seg=16)
CPU_BATCH = 2
PRESENT = (7, 15)  # Label ids of the synthetic image's classes (car, person).


# Synthetic inputs --------------------------------------------------------------------


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """uint8 [h, w, 3]: a smooth background with a few flat ellipses and mild noise.

  Piecewise smooth like a photo (the CRF's permutohedral lattice grows with colour
  variety, so white noise would make it slower than on real images).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([80 + 60 * yy, 110 + 50 * xx, 140 - 40 * yy], -1)
  for _ in range(4):
    cy, cx, ry, rx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), *rng.uniform(0.08, 0.3, 2)
    inside = ((yy * max(h, w) / h - cy) / ry) ** 2 + ((xx * max(h, w) / w - cx) / rx) ** 2 < 1
    img[inside] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 4, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_cams(h: int, w: int, k: int, seed: int = 0) -> np.ndarray:
  """float32 [h, w, k]: one Gaussian blob per class, each map's max 1 (merged CAMs)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  maps = []
  for _ in range(k):
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    s = rng.uniform(0.1, 0.25) * min(h, w)
    maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
  return np.stack(maps, -1).astype(np.float32)


def _labels20() -> np.ndarray:
  labels = np.zeros(20, np.uint8)
  labels[np.asarray(PRESENT) - 1] = 1
  return labels


def _row(stage, variant, batch, sec_per_call, compile_s, notes):
  per_image = sec_per_call / batch
  return dict(stage=stage, variant=variant, batch=batch, images_per_s=1.0 / per_image,
              ms_per_image=per_image * 1e3,
              compile_s=None if compile_s is None else round(compile_s, 2), notes=notes)


# Train steps -------------------------------------------------------------------------

_NETS = dict(cam=heads.CAMNet, aff=heads.AffinityNet, seg=heads.SegNet)


def _train_batch(kind: str, batch: int, crop: int, rng: np.random.Generator) -> dict:
  image = rng.normal(size=(batch, crop, crop, 3)).astype(np.float32)
  if kind == "cam":
    return dict(image=image, labels=np.tile(_labels20().astype(np.float32), (batch, 1)))
  if kind == "aff":
    g = -(-crop // 8)
    return dict(image=image, label_map=rng.choice(np.array([0, *PRESENT, 255], np.uint8),
                                                  size=(batch, g, g)))
  return dict(image=image, mask=rng.choice(np.array([0, *PRESENT, 255], np.uint8),
                                           size=(batch, crop, crop)))


def loss_functions(config) -> dict:
  """The loss function of each network kind ("cam", "aff", "seg") under `config`."""
  return dict(cam=losses.classification_loss,
              aff=functools.partial(losses.affinity_loss, radius=config.aff.radius,
                                    border=config.aff.border),
              seg=losses.segmentation_loss)


def make_trainer(kind: str, loss_fn, backbone: str, mesh):
  """The real train step of network `kind` from random weights, as `loop.train` runs it.

  Returns:
    (step, config, normalization): `step(batch) -> loss` runs one jitted step (donated
    state, data-sharded `batch` of global arrays) and keeps the new state; `config` is
    `defaults.base_config()[kind].train`; `normalization` the backbone's input one.
  """
  config = defaults.base_config()[kind].train
  model = _NETS[kind](backbone, rngs=nnx.Rngs(0))
  frozen = model.backbone.frozen_prefixes
  step = timing.train_steps(
      model, lambda params: optim.make_optimizer(params, config, frozen),
      optim.make_schedule(config), loss_fn, mesh, frozen)
  return step, config, model.backbone.normalization


def bench_train(kind: str, loss_fn, backbone: str, batch: int, crop: int, repeats: int,
                mesh) -> dict:
  """One row: images/s of the real jitted train step of network `kind`."""
  if batch % mesh.size:
    raise UserError(f"--{kind}-batch={batch} is not a multiple of the {mesh.size} devices")
  step, config, _ = make_trainer(kind, loss_fn, backbone, mesh)
  data = sharding.shard_batch(_train_batch(kind, batch, crop, np.random.default_rng(0)), mesh)
  one = lambda: step(data)
  compile_s = timing.first_call(one)
  sec, loss = timing.time_call(one, repeats, warmup=False)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"train_{kind}: loss {float(loss)}")
  return _row(f"train_{kind}", f"{crop}x{crop} crops, {config.optimizer}", batch, sec,
              compile_s, f"{mesh.size} device(s); compile = first step")


# Inference ---------------------------------------------------------------------------


def bench_infer_cam(backbone: str, image: np.ndarray, scales,
                    canvases: canvas_lib.Canvases, repeats: int) -> dict:
  """One row: the infer_cam stage's work on one image (8-pass CAMs, the npz stored) and
  its forward calls alone on the same inputs, timed alternately; the ratio of the two is
  what the stage spends beyond the network."""
  model = heads.CAMNet(backbone, rngs=nnx.Rngs(0))
  forward, state = cam_inference.classifier_forward(model)
  example = dict(image=image, labels=_labels20())
  keys = np.flatnonzero(example["labels"]) + 1
  norm = model.backbone.normalization
  passes = cam_inference.multiscale_inputs(image, norm, scales, True, canvases)
  inputs = [jnp.asarray(np.concatenate([passes[i][0], passes[i + 1][0]]))
            for i in range(0, len(passes), 2)]
  store = workdir.CamStore(tempfile.mkdtemp())

  def stage():
    cams = cam_inference.multiscale_cams(forward, state, example, norm, scales, canvases)
    store.save("x", cams[..., keys - 1], keys)

  compile_s = timing.first_call(stage)
  jax.block_until_ready([forward(state, x) for x in inputs])
  t = timing.time_calls_alternately(
      dict(stage=stage, forwards=lambda: [forward(state, x) for x in inputs]), repeats)
  (sec, cpu), (fwd_sec, fwd_cpu) = t["stage"], t["forwards"]
  h, w = image.shape[:2]
  ch, cw = canvases.canvas(h, w)
  row = _row("infer_cam", f"{h}x{w}, {2 * len(scales)} passes, canvas {ch}x{cw}", 1, sec,
             compile_s, f"forwards alone {fwd_sec * 1e3:,.0f} ms; stage / forwards "
             f"{sec / fwd_sec:.2f} wall, {cpu / fwd_cpu:.2f} CPU")
  return dict(row, forwards_ms_per_image=fwd_sec * 1e3, cpu_ms_per_image=cpu * 1e3,
              forwards_cpu_ms_per_image=fwd_cpu * 1e3, ratio_wall=sec / fwd_sec,
              ratio_cpu=cpu / fwd_cpu)


def bench_crf(image: np.ndarray, cams: np.ndarray, workers: int, num_images: int,
              repeats: int) -> list[dict]:
  """Rows: crf_low_high in this process, then the run_pool of the aff_labels stage."""
  h, w = image.shape[:2]
  keys = np.asarray(PRESENT)
  sec, _ = timing.time_call(lambda: crf.crf_low_high(image, cams, keys), repeats,
                            warmup=False)
  rows = [_row("crf", f"{h}x{w}, {len(keys)}+1 labels, 1 process", 1, sec, None,
               "crf_low_high: 2 CRFs (low + high alpha)")]
  if workers > 1 and num_images > workers:
    # Two pool runs of different lengths: their difference is the steady-state rate
    # (what matters for 10,582 images); the shorter one is mostly process start-up.
    spent = {}
    for n in (workers, num_images):
      ids = [f"img{i:05d}" for i in range(n)]
      with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        crf.run_pool(ids, lambda _: (image, cams, keys), out_dir, workers=workers,
                     progress=False)
        spent[n] = time.perf_counter() - t0
    steady = (spent[num_images] - spent[workers]) / (num_images - workers)
    rows.append(_row("crf", f"run_pool, {workers} workers, end to end", num_images,
                     spent[num_images], None, "start-up and store writes included"))
    if steady > 0:  # Not so when start-up noise swamps too few images.
      rows.append(_row("crf", f"run_pool, {workers} workers, steady state", 1, steady, None,
                       f"(t({num_images}) - t({workers})) / {num_images - workers} images; "
                       f"start-up ~{spent[workers] - workers * steady:.1f} s"))
  return rows


def bench_infer_rw(backbone: str, image: np.ndarray, cams: np.ndarray, batches,
                   repeats: int) -> list[dict]:
  """Rows: AffinityNet forward + walk as the infer_rw stage does, per batch size, and
  the dense CRF the stage runs on each walked image."""
  config = defaults.base_config()
  rw = config.rw
  model = heads.AffinityNet(backbone, rngs=nnx.Rngs(0))
  walk, state = walk_inference.walker(model, rw)

  x, _ = transforms.pad_to_multiple(transforms.normalize(image, model.backbone.normalization),
                                    STRIDE, 0.0)
  grid = walk_inference.walk_input(cams, np.asarray(PRESENT), rw.alpha, x.shape[:2])
  rows = []
  for b in batches:
    canvas = canvas_lib.Canvases.from_config(config.data).at_scale(*image.shape[:2])
    xs, gs, valid = walk_inference.batch_inputs([x] * b, [grid] * b, canvas)
    gh, gw = valid.shape[1:]
    args = (state, *map(jnp.asarray, (xs, gs, valid)))
    compile_s = timing.first_call(lambda: walk(*args))
    sec, _ = timing.time_call(lambda: walk(*args), repeats, warmup=False)
    rows.append(_row("infer_rw", f"forward + walk t={rw.t}, grid {grid.shape[0]}x"
                     f"{grid.shape[1]} in {gh}x{gw}", b, sec, compile_s,
                     f"radius {rw.radius}, beta {rw.beta:g}, border {rw.border}"))
  probs = np.concatenate([(1 - cams.max(-1, keepdims=True)) ** rw.alpha, cams], -1)
  sec, _ = timing.time_call(lambda: crf.dense_crf(image, probs), repeats, warmup=False)
  rows.append(_row("infer_rw", "dCRF after the walk", 1, sec, None,
                   "1 CRF per image in 1 process (rw.dcrf; the stage runs "
                   "crf.num_workers of them alongside the walk)"))
  return rows


# Summary -----------------------------------------------------------------------------


def _summary_rows(rows: list[dict], stage: str) -> list[dict]:
  """The rows that stand for how the pipeline runs `stage` (the best of them is used)."""
  mine = [r for r in rows if r["stage"] == stage and not r["variant"].startswith("dCRF")
          and not r["variant"].endswith("end to end")]
  pooled = [r for r in mine if r["variant"].endswith("steady state")]
  return pooled or mine  # aff_labels runs the pool when it has more than one worker.


def summary(rows: list[dict]) -> list[dict]:
  """Hours of each stage on train_aug, from its best measured rate.

  Training work is steps x batch of `defaults.base_config()` (the spec's epochs); CAMs,
  CRF labels and walks are one per train_aug image. infer_rw with `rw.dcrf` runs its
  CRFs in `crf.num_workers` processes alongside the walk: it takes the longer of the
  walk and the CRF time over the workers.
  """
  c = defaults.base_config()
  work = dict(train_cam=c.cam.train.steps * c.cam.batch_size, infer_cam=TRAIN_AUG,
              crf=TRAIN_AUG, train_aff=c.aff.train.steps * c.aff.batch_size,
              infer_rw=TRAIN_AUG, train_seg=c.seg.train.steps * c.seg.batch_size)
  out = []
  for stage, images in work.items():
    best = max(_summary_rows(rows, stage), key=lambda r: r["images_per_s"], default=None)
    if best is None:
      continue
    sec = 1.0 / best["images_per_s"]
    used = f"{best['variant']}, batch {best['batch']}"
    dcrf = [r for r in rows if r["stage"] == stage and r["variant"].startswith("dCRF")]
    if dcrf and c.rw.dcrf:
      workers = max(1, c.crf.num_workers)
      sec = max(sec, dcrf[0]["ms_per_image"] / 1e3 / workers)
      used += f" alongside dCRF in {workers} processes"
    out.append(dict(stage=stage, images=images, images_per_s=1.0 / sec,
                    hours=images * sec / 3600, rate_from=used))
  total = sum(s["hours"] for s in out)
  for s in out:
    s["share"] = s["hours"] / total if total else 0.0
  return out


def verdict(summ: list[dict]) -> dict:
  """The bottleneck stage and whether the random walk or the CRF is it."""
  if not summ:
    return {}
  worst = max(summ, key=lambda s: s["hours"])
  share = {s["stage"]: s["share"] for s in summ}
  return dict(bottleneck=worst["stage"], total_hours=sum(s["hours"] for s in summ),
              rw_share=share.get("infer_rw"), crf_share=share.get("crf"),
              rw_or_crf_is_bottleneck=worst["stage"] in ("infer_rw", "crf"))


def _print_tables(rows, summ, verd):
  print(f"{'stage':<10} {'variant':<44} {'B':>3} {'img/s':>9} {'ms/img':>10} "
        f"{'compile s':>9}  notes")
  for r in rows:
    comp = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    print(f"{r['stage']:<10} {r['variant']:<44} {r['batch']:>3} {r['images_per_s']:>9.3f} "
          f"{r['ms_per_image']:>10.1f} {comp:>9}  {r['notes']}")
  if not summ:
    return
  print(f"\nwork on train_aug ({TRAIN_AUG:,} images; training = steps x batch of the "
        "defaults)")
  print(f"{'stage':<10} {'images':>8} {'img/s':>9} {'hours':>9} {'share':>6}  rate from")
  for s in summ:
    print(f"{s['stage']:<10} {s['images']:>8,} {s['images_per_s']:>9.3f} {s['hours']:>9.2f} "
          f"{s['share']:>6.1%}  {s['rate_from']}")
  rw = "n/a" if verd["rw_share"] is None else f"{verd['rw_share']:.1%}"
  cr = "n/a" if verd["crf_share"] is None else f"{verd['crf_share']:.1%}"
  print(f"bottleneck: {verd['bottleneck']} of {verd['total_hours']:.1f} h in all; "
        f"random walk {rw}, CRF {cr} of the total -> "
        + ("the walk or the CRF IS the bottleneck" if verd["rw_or_crf_is_bottleneck"]
           else "neither the walk nor the CRF is the bottleneck"))


def _size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise UserError(f"--image={text!r}: expected HxW, e.g. 375x500") from None
  return h, w


def main(argv=None):
  on_cpu = jax.devices()[0].platform == "cpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backbone", default="lite0" if on_cpu else "resnet38",
                 help="resnet38 | vgg16 | lite0 | tiny (default lite0 on CPU, else resnet38)")
  p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
  p.add_argument("--crop", type=int, default=448, help="training crop size")
  p.add_argument("--image", default="375x500", help="HxW of the inference/CRF image")
  for kind in ("cam", "aff", "seg"):
    p.add_argument(f"--{kind}-batch", type=int,
                   default=CPU_BATCH if on_cpu else ACCEL_BATCH[kind],
                   help=f"train batch (spec {ACCEL_BATCH[kind]}; default {CPU_BATCH} on CPU)")
  p.add_argument("--rw-batch", type=int,
                 default=CPU_BATCH if on_cpu else defaults.base_config().rw.batch_size,
                 help="batched walk size, besides batch 1 (default rw.batch_size; 2 on CPU)")
  p.add_argument("--crf-workers", type=int, default=defaults.base_config().crf.num_workers)
  p.add_argument("--crf-images", type=int, default=0, help="pool images (default 4 x workers)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="pipeline.json")
  a = p.parse_args(argv)
  stages = [s for s in a.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise UserError(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
  h, w = _size(a.image)
  image = synthetic_image(h, w)
  cams = synthetic_cams(h, w, len(PRESENT))
  mesh = sharding.make_mesh()
  base = defaults.base_config()
  info = timing.device_info()
  print(f"backbone {a.backbone} on {info['devices']} x {info['device']} ({info['host']}), "
        f"jax {info['jax']}; compile excluded, median of {a.repeats}", flush=True)

  loss_fns = loss_functions(base)
  rows = []
  for stage in STAGES:
    if stage not in stages:
      continue
    if stage.startswith("train_"):
      kind = stage[len("train_"):]
      new = [bench_train(kind, loss_fns[kind], a.backbone, getattr(a, f"{kind}_batch"),
                         a.crop, a.repeats, mesh)]
    elif stage == "infer_cam":
      new = [bench_infer_cam(a.backbone, image, tuple(base.cam.scales),
                             canvas_lib.Canvases.from_config(base.data), a.repeats)]
    elif stage == "crf":
      new = bench_crf(image, cams, a.crf_workers, a.crf_images or 4 * a.crf_workers,
                      a.repeats)
    else:
      new = bench_infer_rw(a.backbone, image, cams, sorted({1, a.rw_batch}), a.repeats)
    for r in new:
      print(f"  {r['stage']}: {r['variant']}, batch {r['batch']}: "
            f"{r['images_per_s']:.3f} img/s", flush=True)
    rows += new
  summ = summary(rows)
  verd = verdict(summ)
  print()
  _print_tables(rows, summ, verd)
  io.write_json(a.out, dict(info, backbone=a.backbone, crop=a.crop, image=[h, w],
                            repeats=a.repeats, crf_workers=a.crf_workers, rows=rows,
                            summary=summ, **verd))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
