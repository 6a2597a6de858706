"""Stage 1: train the classifier (`train_cam`) and infer multi-scale CAMs (`infer_cam`)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from affinity_jax.data import pipeline
from affinity_jax.ops import cam as cam_ops
from affinity_jax.stages import common
from affinity_jax.training import loop


def classification_loss(model, batch, rng, train=True):
  """Multi-label soft margin: the mean over classes and images of the sigmoid BCE."""
  logits, _ = model(batch["image"], train=train, key=rng)
  labels = batch["labels"][:, :logits.shape[-1]].astype(jnp.float32)
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  accuracy = jnp.mean((logits > 0) == (labels > 0.5))
  return loss, {"label_accuracy": accuracy}


def train(ctx: common.Context) -> None:
  c = ctx.config
  model = ctx.make_model("cam")
  batches = pipeline.classification_batches(
      ctx.split(c.data.train_split), mesh=ctx.mesh, batch_size=c.cam.batch_size,
      seed=c.seed, crop_size=c.cam.crop, long_side=tuple(c.cam.resize_long),
      normalization=common.normalization(model), jitter=c.data.color_jitter,
      worker_count=c.data.num_workers)
  loop.train(model, classification_loss, batches, c.cam.train, ctx.path("cam"),
             model.backbone.frozen_prefixes, ctx.mesh)


def infer(ctx: common.Context) -> None:
  """Writes `cam_maps/<id>.npz`: the merged 8-pass CAMs of each image's present classes."""
  c = ctx.config
  model = ctx.trained_model("cam")
  forward, state = classifier_forward(model)
  norm = common.normalization(model)
  merge = jitted_merge()
  out_dir = ctx.path("cam_maps")
  for image_id in tqdm(ctx.label_ids(), desc="infer_cam", disable=None):
    path = os.path.join(out_dir, image_id + ".npz")
    if os.path.exists(path):
      continue
    example = ctx.example(image_id)
    cams = multiscale_cams(forward, state, merge, example, norm, tuple(c.cam.scales),
                           c.data.infer_pad)
    keys = np.flatnonzero(example["labels"]) + 1
    common.save_cams(path, cams[..., keys - 1], keys)
  common.mark_finished(ctx, "cam_maps")


def classifier_forward(model):
  """The classifier in inference mode, split for jit.

  Returns:
    (forward, state): jitted `forward(state, x [B,H,W,3]) -> (logits [B,20],
    cams [B,ceil(H/8),ceil(W/8),20])` and the model's nnx state.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    logits, aux = nnx.merge(graphdef, state)(x, train=False)
    return logits, aux["cams"]

  return forward, state


def jitted_merge():
  """`ops.cam.merge_cams` jitted, with the plan and the image size static."""
  return jax.jit(cam_ops.merge_cams, static_argnames=("plan", "size"))


def multiscale_cams(forward, state, merge, example: dict, normalization: str,
                    scales: tuple[float, ...], pad_multiple: int = 8) -> np.ndarray:
  """The spec's 8-pass CAM of one image: float32 [H, W, 20], each class max-normalised.

  Args:
    forward: from `classifier_forward`.
    state: the classifier's nnx state.
    merge: from `jitted_merge`.
    example: a dataset example (image, labels).
    normalization: the backbone's input normalisation.
    scales: inference scales; every scale runs unflipped and flipped in one call.
    pad_multiple: inputs are padded to a multiple of this (of 8).
  """
  passes = pipeline.multiscale_inputs(example["image"], normalization, scales, flip=True,
                                      multiple=pad_multiple)
  cams, plan = [], []
  for i in range(0, len(passes), 2):
    (x0, r0), (x1, r1) = passes[i], passes[i + 1]
    _, out = forward(state, jnp.asarray(np.concatenate([x0, x1])))
    cams += [out[:1], out[1:]]
    plan += [r0, r1]
  size = example["image"].shape[:2]
  labels = jnp.asarray(example["labels"][None])
  return np.asarray(merge(cams, plan=tuple(plan), size=size, labels=labels)[0])

