"""Stage `eval`: score CAM, CAM+RW, CAM+RW+dCRF pseudo masks and the segmentation net.

Writes the workdir's reports: results.json, results.md (IoU per class and mIoU, methods
side by side), confusion_<method>.png and overlays.png.
"""

import jax

from affinity_jax import constants
from affinity_jax.evaluation import confusion
from affinity_jax.evaluation import label_quality
from affinity_jax.evaluation import plots
from affinity_jax.evaluation import report
from affinity_jax.inference import cam
from affinity_jax.ops import neighbors
from affinity_jax.progress import Progress
from affinity_jax.stages import common


def done(ctx: common.Context) -> bool:
  return ctx.files.reports.finished()


def run(ctx: common.Context) -> dict:
  c, files = ctx.config, ctx.files
  # Reading a checkpoint is collective on several hosts: each loads the net, the first
  # evaluates.
  predict = ctx.segmenter() if c.seg.enabled else None
  if jax.process_index() != 0:
    return {}
  ids = ctx.split(c.data.eval_split).ids()
  gt = lambda image_id: ctx.example(image_id)["mask"]
  cms = cam_methods(ctx, ids, gt)
  methods = {"CAM+RW": ((files.rw.load(i), gt(i)) for i in ids)}
  if c.rw.dcrf:
    methods["CAM+RW+dCRF"] = ((files.rw_crf.load(i), gt(i)) for i in ids)
  if c.seg.enabled:
    split = ctx.split(c.data.seg_eval_split)
    methods[f"seg ({c.data.seg_eval_split})"] = (
        (predict(e["image"]), e["mask"]) for e in (split[i] for i in range(len(split))))
  cms.update(confusion.evaluate(methods, progress=True))
  names = constants.label_names(c.data.name)
  plots.confusion_plots(files.reports.directory,
                        {k: v for k, v in cms.items() if not k.startswith("CAM (best")}, names)
  rows = [dict(image=ctx.example(i)["image"], cam=files.cams.load(i)[0],
               pseudo=files.rw.load(i), gt=gt(i), title=i,
               **(dict(pseudo_crf=files.rw_crf.load(i)) if c.rw.dcrf else {}))
          for i in ids[:c.eval.num_overlays]]
  plots.overlay_grid(files.reports.path("overlays.png"), rows)
  have_crf = [i for i in ids if files.crf.exists(i)]
  labels = label_quality.measure(
      Progress(have_crf, desc="affinity labels", unit="img"), files.crf.load, gt,
      neighbors.half_disk_offsets(c.aff.radius), c.aff.border) if have_crf else None
  title = (f"{c.data.name}: pseudo masks on {c.data.eval_split}"
           + (f", segmentation net on {c.data.seg_eval_split}" if c.seg.enabled else ""))
  return report.write(files.reports.directory, cms, only_present=c.data.name == "scenes",
                      title=title, names=names, labels=labels,
                      curves=files.training_logs())


def cam_methods(ctx: common.Context, ids: list[str], gt) -> dict:
  """CAM-only labels at `eval.cam_threshold` and at `eval.cam_sweep`'s best threshold."""
  pairs = ((cam.full_cams(*ctx.files.cams.load(i)), gt(i))
           for i in Progress(ids, desc="CAM", unit="img"))
  c = ctx.config.eval
  return confusion.cam_baselines(pairs, c.cam_threshold, c.cam_sweep)
