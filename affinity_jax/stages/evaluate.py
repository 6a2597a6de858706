"""Stage `eval`: score CAM, CAM+RW, CAM+RW+dCRF pseudo masks and the segmentation net.

Writes the workdir's reports: results.json, results.md (IoU per class and mIoU, methods
side by side), confusion_<method>.png and overlays.png.
"""

import jax

from affinity_jax import constants
from affinity_jax import workdir as workdir_lib
from affinity_jax.evaluation import confusion
from affinity_jax.evaluation import plots
from affinity_jax.evaluation import pseudo_labels
from affinity_jax.evaluation import report
from affinity_jax.stages import common


def seg_method(config) -> str:
  """The segmentation net's name in the reports."""
  return workdir_lib.ReportStore.seg_method(config.data.seg_eval_split)


def done(ctx: common.Context) -> bool:
  """The reports exist, and score the segmentation net when it is enabled: a workdir
  evaluated before `seg.enabled` was set is evaluated again once the net is trained."""
  reports = ctx.files.reports
  if not reports.finished():
    return False
  return not ctx.config.seg.enabled or seg_method(ctx.config) in reports.methods()


def run(ctx: common.Context) -> dict:
  c, files = ctx.config, ctx.files
  # Reading a checkpoint is collective on several hosts: each loads the net, the first
  # evaluates.
  predict = ctx.segmenter() if c.seg.enabled else None
  if jax.process_index() != 0:
    return {}
  ids, examples = ctx.split(c.data.eval_split).ids(), ctx.examples
  cms = pseudo_labels.confusions(files, examples, ids, cam_threshold=c.eval.cam_threshold,
                                 cam_sweep=c.eval.cam_sweep, dcrf=c.rw.dcrf)
  if c.seg.enabled:
    split = ctx.split(c.data.seg_eval_split)
    cms.update(confusion.evaluate({seg_method(c): (
        (predict(e["image"]), e["mask"]) for e in (split[i] for i in range(len(split))))},
        progress=True))
  names = constants.label_names(c.data.name)
  plots.confusion_plots(files.reports.directory,
                        {k: v for k, v in cms.items() if not k.startswith("CAM (best")}, names)
  pseudo_labels.overlays(files.reports.path("overlays.png"), files, examples,
                         ids[:c.eval.num_overlays], c.rw.dcrf)
  labels = pseudo_labels.affinity_labels(files, examples, ids, c.aff.radius, c.aff.border)
  title = (f"{c.data.name}: pseudo masks on {c.data.eval_split}"
           + (f", segmentation net on {c.data.seg_eval_split}" if c.seg.enabled else ""))
  return report.write(files.reports.directory, cms, only_present=c.data.name == "scenes",
                      title=title, names=names, labels=labels,
                      curves=files.training_logs())
