"""Stage 1: train the classifier (`train_cam`) and infer multi-scale CAMs (`infer_cam`)."""

import collections
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
from affinity_jax.training import mesh as mesh_lib


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
             ctx.frozen_prefixes("cam", model), ctx.mesh)


def infer(ctx: common.Context) -> None:
  """Writes `cam_maps/<id>.npz`: the merged 8-pass CAMs of each image's present classes.

  Images of the same size go through the passes together, up to `cam.infer_batch` at a
  time, each forward split over this host's devices (every host infers its own ids).
  """
  c = ctx.config
  model = ctx.trained_model("cam")
  mesh = mesh_lib.make_mesh(jax.local_devices())
  forward, state = classifier_forward(model, mesh)
  norm = common.normalization(model)
  merge = jitted_merge()
  out_dir = ctx.path("cam_maps")
  path = lambda image_id: os.path.join(out_dir, image_id + ".npz")
  todo = [i for i in ctx.label_ids() if not os.path.exists(path(i))]
  with tqdm(total=len(todo), desc="infer_cam", disable=None) as bar:
    for start in range(0, len(todo), c.cam.infer_batch):
      by_size = collections.defaultdict(list)
      for image_id in todo[start:start + c.cam.infer_batch]:
        example = ctx.example(image_id)
        by_size[example["image"].shape].append((image_id, example))
      for group in by_size.values():
        examples = [example for _, example in group]
        cams = batched_cams(forward, state, merge, examples, norm, tuple(c.cam.scales),
                            c.data.infer_pad)
        for (image_id, example), cam in zip(group, cams):
          keys = np.flatnonzero(example["labels"]) + 1
          common.save_cams(path(image_id), cam[..., keys - 1], keys)
          bar.update(1)
  common.mark_finished(ctx, "cam_maps")


def classifier_forward(model, mesh=None):
  """The classifier in inference mode, split for jit.

  Args:
    model: a CAM network.
    mesh: optional device mesh: the parameters are replicated on it and each input
      batch is split over its `data` axis (the batch must be a multiple of its size).

  Returns:
    (forward, state): jitted `forward(state, x [B,H,W,3]) -> (logits [B,20],
    cams [B,ceil(H/8),ceil(W/8),20])` and the model's nnx state.
  """
  graphdef, state = nnx.split(model)

  def forward(state, x):
    logits, aux = nnx.merge(graphdef, state)(x, train=False)
    return logits, aux["cams"]

  return mesh_lib.jit_over_batch(forward, state, mesh)


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
  return batched_cams(forward, state, merge, [example], normalization, scales,
                      pad_multiple)[0]


def batched_cams(forward, state, merge, examples: list[dict], normalization: str,
                 scales: tuple[float, ...], pad_multiple: int = 8) -> list[np.ndarray]:
  """`multiscale_cams` of several images of one size, one forward call per scale.

  Each call holds every image unflipped and flipped, [2n, Hp, Wp, 3], padded with zero
  images to a multiple of the devices that `state` is replicated on (`forward` splits
  its batch over them).

  Returns:
    One float32 [H, W, 20] per example, as `multiscale_cams` gives it.
  """
  size = examples[0]["image"].shape[:2]
  if any(e["image"].shape[:2] != size for e in examples):
    raise ValueError("batched_cams takes images of one size")
  passes = [pipeline.multiscale_inputs(e["image"], normalization, scales, flip=True,
                                       multiple=pad_multiple) for e in examples]
  plan = tuple(p for _, p in passes[0])
  n, multiple = len(examples), len(jax.tree.leaves(state)[0].sharding.device_set)
  cams = [[] for _ in examples]
  for i in range(0, len(plan), 2):   # Each scale unflipped, then flipped.
    x = np.concatenate([np.concatenate([inputs[i][0], inputs[i + 1][0]])
                        for inputs in passes])
    _, out = forward(state, jnp.asarray(mesh_lib.pad_batch(x, multiple)))
    for b in range(n):
      cams[b] += [out[2 * b:2 * b + 1], out[2 * b + 1:2 * b + 2]]
  return [np.asarray(merge(cam, plan=plan, size=size,
                           labels=jnp.asarray(e["labels"][None]))[0])
          for cam, e in zip(cams, examples)]
