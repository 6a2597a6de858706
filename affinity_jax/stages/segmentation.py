"""Stage 5 (`train_seg`): a segmentation network trained on the random-walk pseudo masks."""

from affinity_jax.data import pipeline
from affinity_jax.stages import common
from affinity_jax.training import losses


def train(ctx: common.Context) -> None:
  c = ctx.config
  if not c.seg.enabled or ctx.nothing_to_train("seg"):
    return
  model = ctx.make_model("seg")
  batches = pipeline.segmentation_batches(
      ctx.split(c.data.train_split), ctx.files.pseudo_labels(c.rw.dcrf).load,
      mesh=ctx.mesh, batch_size=c.seg.batch_size, seed=c.seed, crop_size=c.seg.crop,
      long_side=tuple(c.seg.resize_long), normalization=model.backbone.normalization,
      jitter=c.data.color_jitter, worker_count=c.data.num_workers)
  common.train(ctx, "seg", model, losses.segmentation_loss, batches)
