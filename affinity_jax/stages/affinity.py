"""Stages 2 and 3: CRF labels on the host (`aff_labels`) and AffinityNet (`train_aff`)."""

import functools

from affinity_jax import stopping
from affinity_jax.data import pipeline
from affinity_jax.labels import crf
from affinity_jax.stages import common
from affinity_jax.training import losses


def make_labels(ctx: common.Context) -> None:
  """Stores the low- and high-alpha CRF marginals (uint8) of every image's CAMs."""
  c, files = ctx.config, ctx.files

  def load(image_id):
    return (ctx.example(image_id)["image"], *files.cams.load(image_id))

  # The workers write the store's files themselves (they import only `labels`).
  crf.run_pool(ctx.label_ids(), load, files.crf.directory, workers=c.crf.num_workers,
               la_alpha=c.crf.la_alpha, ha_alpha=c.crf.ha_alpha)
  stopping.stop_if_requested("in aff_labels, the images labelled so far stored")
  files.crf.mark_finished()


def train(ctx: common.Context) -> None:
  c = ctx.config
  if ctx.nothing_to_train("aff"):
    return
  model = ctx.make_model("aff")
  batches = pipeline.affinity_batches(
      ctx.split(c.data.train_split), ctx.files.crf.load,
      mesh=ctx.mesh, batch_size=c.aff.batch_size, seed=c.seed, crop_size=c.aff.crop,
      normalization=model.backbone.normalization, jitter=c.data.color_jitter,
      worker_count=c.data.num_workers)
  loss_fn = functools.partial(losses.affinity_loss, radius=c.aff.radius, border=c.aff.border)
  common.train(ctx, "aff", model, loss_fn, batches)
