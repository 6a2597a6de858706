"""The training losses of the three networks: `loss_fn(model, batch, rng, train=True)
-> (scalar loss, dict of scalar metrics)`, as `loop.train` takes them."""

import jax.numpy as jnp
import optax

from affinity_jax import constants
from affinity_jax.ops import affinity as aff_ops
from affinity_jax.ops import neighbors


def classification_loss(model, batch, rng, train=True):
  """Multi-label soft margin: the mean over classes and images of the sigmoid BCE."""
  logits, _ = model(batch["image"], train=train, key=rng)
  labels = batch["labels"][:, :logits.shape[-1]].astype(jnp.float32)
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  accuracy = jnp.mean((logits > 0) == (labels > 0.5))
  return loss, {"label_accuracy": accuracy}


def affinity_loss(model, batch, rng, train=True, *, radius: int, border: str):
  """The spec's L_bg/4 + L_fg/4 + L_neg/2 on the embedding's pairs within `radius`."""
  embedding, _ = model(batch["image"], train=train, key=rng)
  offsets = neighbors.half_disk_offsets(radius)
  labels = aff_ops.affinity_labels(batch["label_map"], offsets, border=border)
  aff = aff_ops.pairwise_affinity(embedding, offsets)
  loss, aux = aff_ops.affinity_loss(aff, labels, border=border)
  return loss, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}


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
