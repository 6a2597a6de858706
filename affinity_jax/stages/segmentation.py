"""Stage 5 (`train_seg`): a segmentation network trained on the random-walk pseudo masks."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from affinity_jax import constants
from affinity_jax.data import pipeline
from affinity_jax.data import transforms
from affinity_jax.evaluation import confusion
from affinity_jax.stages import common
from affinity_jax.training import loop


def segmentation_loss(model, batch, rng, train=True):
  """Pixel-wise softmax cross-entropy over pixels whose mask is not 255."""
  logits, _ = model(batch["image"], train=train, key=rng)
  mask = batch["mask"].astype(jnp.int32)
  valid = mask != constants.IGNORE
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, mask, 0))
  count = jnp.sum(valid)
  loss = jnp.sum(ce * valid) / jnp.maximum(count, 1)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == mask) * valid) / jnp.maximum(count, 1)
  return loss, {"pixel_accuracy": accuracy}


def pseudo_mask(directory: str, image_id: str) -> np.ndarray:
  """The pseudo mask `<directory>/<id>.png` (picklable loader for the input pipeline)."""
  return confusion.read_label_png(os.path.join(directory, image_id + ".png"))


def train(ctx: common.Context) -> None:
  c = ctx.config
  if not c.seg.enabled:
    return
  model = ctx.make_model("seg")
  masks = functools.partial(pseudo_mask, ctx.path("rw_crf" if c.rw.dcrf else "rw"))
  batches = pipeline.segmentation_batches(
      ctx.split(c.data.train_split), masks, mesh=ctx.mesh, batch_size=c.seg.batch_size,
      seed=c.seed, crop_size=c.seg.crop, long_side=tuple(c.seg.resize_long),
      normalization=common.normalization(model), jitter=c.data.color_jitter,
      worker_count=c.data.num_workers)
  loop.train(model, segmentation_loss, batches, c.seg.train, ctx.path("seg"),
             ctx.frozen_prefixes("seg", model), ctx.mesh)


def predictor(model: nnx.Module, pad_multiple: int = 8):
  """`predict(image uint8 [H, W, 3]) -> label ids uint8 [H, W]` (single scale).

  The input is zero-padded (bottom/right) to a multiple of `pad_multiple` (of 8).
  """
  graphdef, state = nnx.split(model)
  norm = common.normalization(model)

  @jax.jit
  def forward(state, x):
    logits, _ = nnx.merge(graphdef, state)(x, train=False)
    return jnp.argmax(logits, -1).astype(jnp.uint8)

  def predict(image: np.ndarray) -> np.ndarray:
    x, _ = transforms.pad_to_multiple(transforms.normalize(image, norm), pad_multiple, 0.0)
    return np.asarray(forward(state, jnp.asarray(x[None])))[0, :image.shape[0],
                                                              :image.shape[1]]
  return predict
