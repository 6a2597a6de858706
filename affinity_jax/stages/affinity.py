"""Stages 2 and 3: CRF labels on the host (`aff_labels`) and AffinityNet (`train_aff`)."""

import functools

import jax.numpy as jnp

from affinity_jax.data import pipeline
from affinity_jax.labels import crf
from affinity_jax.labels import store
from affinity_jax.ops import affinity as aff_ops
from affinity_jax.ops import neighbors
from affinity_jax.stages import common
from affinity_jax.training import loop


def make_labels(ctx: common.Context) -> None:
  """Writes `crf/<id>.npz`: low- and high-alpha CRF marginals (uint8) of every image."""
  c = ctx.config

  def load(image_id):
    cams, keys = common.load_cams(ctx.path("cam_maps", image_id + ".npz"))
    return ctx.example(image_id)["image"], cams, keys

  crf.run_pool(ctx.label_ids(), load, ctx.path("crf"), workers=c.crf.num_workers,
               la_alpha=c.crf.la_alpha, ha_alpha=c.crf.ha_alpha)
  common.mark_finished(ctx, "crf")


def affinity_loss(model, batch, rng, train=True, *, radius: int, border: str):
  """The spec's L_bg/4 + L_fg/4 + L_neg/2 on the embedding's pairs within `radius`."""
  embedding, _ = model(batch["image"], train=train, key=rng)
  offsets = neighbors.half_disk_offsets(radius)
  labels = aff_ops.affinity_labels(batch["label_map"], offsets, border=border)
  aff = aff_ops.pairwise_affinity(embedding, offsets)
  loss, aux = aff_ops.affinity_loss(aff, labels, border=border)
  return loss, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}


def train(ctx: common.Context) -> None:
  c = ctx.config
  model = ctx.make_model("aff")
  batches = pipeline.affinity_batches(
      ctx.split(c.data.train_split), functools.partial(store.load, ctx.path("crf")),
      mesh=ctx.mesh, batch_size=c.aff.batch_size, seed=c.seed, crop_size=c.aff.crop,
      normalization=common.normalization(model), jitter=c.data.color_jitter,
      worker_count=c.data.num_workers)
  loss_fn = functools.partial(affinity_loss, radius=c.aff.radius, border=c.aff.border)
  loop.train(model, loss_fn, batches, c.aff.train, ctx.path("aff"),
             ctx.frozen_prefixes("aff", model), ctx.mesh)
