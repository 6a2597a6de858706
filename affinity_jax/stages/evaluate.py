"""Stage `eval`: score CAM, CAM+RW, CAM+RW+dCRF pseudo masks and the segmentation net.

Writes `eval/results.json`, `eval/results.md` (IoU per class and mIoU, methods side by
side), `eval/confusion_<method>.png` and `eval/overlays.png`.
"""

import functools
import os

import jax
import numpy as np
from tqdm import tqdm

from affinity_jax import constants
from affinity_jax.evaluation import confusion
from affinity_jax.evaluation import label_quality
from affinity_jax.evaluation import plots
from affinity_jax.evaluation import report
from affinity_jax.labels import store
from affinity_jax.ops import cam as cam_ops
from affinity_jax.ops import metrics
from affinity_jax.ops import neighbors
from affinity_jax.stages import common
from affinity_jax.stages import segmentation


def done(ctx: common.Context) -> bool:
  return os.path.exists(ctx.path("eval", "results.json"))


def cam_confusions(ctx: common.Context, ids: list[str], gt) -> dict[float, np.ndarray]:
  """Confusion matrices of CAM-only labels (argmax over [constant background score,
  CAMs]) at `eval.cam_threshold` and every `eval.cam_sweep` threshold, in one pass."""
  c = ctx.config.eval
  thresholds = tuple(dict.fromkeys((c.cam_threshold,) + tuple(c.cam_sweep)))
  cms = {t: 0 for t in thresholds}
  for image_id in tqdm(ids, desc="CAM", unit="img"):
    cams, keys = common.load_cams(ctx.path("cam_maps", image_id + ".npz"))
    full, target = common.full_cams(cams, keys), gt(image_id)
    for t in thresholds:
      cms[t] = cms[t] + metrics.confusion_np(np.asarray(cam_ops.cam_label_map(full, t)),
                                             target)
  return cms


def _examples(ctx: common.Context, split: str):
  source = ctx.split(split)
  for i in range(len(source)):
    yield source[i]


def run(ctx: common.Context) -> dict:
  c = ctx.config
  if jax.process_index() != 0:
    return {}
  split = ctx.split(c.data.eval_split)
  ids = split.ids()
  gt = lambda image_id: ctx.example(image_id)["mask"]
  cam_cms = cam_confusions(ctx, ids, gt)
  cms = {"CAM": cam_cms[c.eval.cam_threshold]}
  if c.eval.cam_sweep:
    mious = {t: metrics.mean_iou(cam_cms[t]) for t in c.eval.cam_sweep}
    best = max(mious, key=mious.get)
    cms[f"CAM (best t={best:g})"] = cam_cms[best]
    print("CAM mIoU by background threshold: "
          + ", ".join(f"{t:g}: {100 * m:.1f}" for t, m in mious.items()), flush=True)
  methods = {"CAM+RW": confusion.png_pairs(ids, ctx.path("rw"), gt)}
  if c.rw.dcrf:
    methods["CAM+RW+dCRF"] = confusion.png_pairs(ids, ctx.path("rw_crf"), gt)
  if c.seg.enabled:
    predict = segmentation.predictor(ctx.trained_model("seg"), c.data.infer_pad)
    methods[f"seg ({c.data.seg_eval_split})"] = (
        (predict(e["image"]), e["mask"]) for e in _examples(ctx, c.data.seg_eval_split))
  cms.update(confusion.evaluate(methods, progress=True))
  names = constants.label_names(c.data.name)
  out = ctx.path("eval")
  for name, cm in cms.items():
    if name.startswith("CAM (best"):
      continue
    slug = name.split(" ")[0].replace("+", "_").lower()
    plots.confusion_plot(os.path.join(out, f"confusion_{slug}.png"), cm, names,
                         title=name)
  rows = []
  for image_id in ids[:c.eval.num_overlays]:
    cams, _ = common.load_cams(ctx.path("cam_maps", image_id + ".npz"))
    row = dict(image=ctx.example(image_id)["image"], cam=cams,
               pseudo=confusion.read_label_png(ctx.path("rw", image_id + ".png")),
               gt=gt(image_id), title=image_id)
    if c.rw.dcrf:
      row["pseudo_crf"] = confusion.read_label_png(ctx.path("rw_crf", image_id + ".png"))
    rows.append(row)
  plots.overlay_grid(os.path.join(out, "overlays.png"), rows)
  labels = affinity_label_quality(ctx, ids, gt)
  title = (f"{c.data.name}: pseudo masks on {c.data.eval_split}"
           + (f", segmentation net on {c.data.seg_eval_split}" if c.seg.enabled else ""))
  return report.write(out, cms, only_present=c.data.name == "scenes", title=title,
                      names=names, labels=labels)


def affinity_label_quality(ctx: common.Context, ids: list[str], gt) -> dict | None:
  """`label_quality.measure` over the scored images that have CRF labels (None if none)."""
  crf_dir = ctx.path("crf")
  have = [i for i in ids if store.exists(crf_dir, i)]
  if not have:
    return None
  offsets = neighbors.half_disk_offsets(ctx.config.aff.radius)
  return label_quality.measure(tqdm(have, desc="affinity labels", unit="img"),
                               functools.partial(store.load, crf_dir), gt, offsets,
                               ctx.config.aff.border)
