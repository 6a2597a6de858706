"""The classifier in inference mode: the spec's 8-pass multi-scale CAMs, image labels."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import constants
from affinity_jax.data import pipeline
from affinity_jax.data import transforms
from affinity_jax.inference import STRIDE
from affinity_jax.training import mesh as mesh_lib


class Classifier:
  """A trained CAM network: CAMs of images of any sizes, and predicted image labels.

  Args:
    model: a CAM network.
    scales: inference scales; every scale runs unflipped and flipped.
    pad_multiple: inputs are zero-padded to a multiple of this (of 8).
    mesh: optional device mesh the forward splits each batch over (see
      `classifier_forward`).
  """

  def __init__(self, model: nnx.Module, scales: tuple[float, ...], pad_multiple: int = 8,
               mesh: jax.sharding.Mesh | None = None):
    self.forward, self.state = classifier_forward(model, mesh)
    self.normalization = model.backbone.normalization
    self.scales = tuple(scales)
    self.pad_multiple = pad_multiple

  def cams(self, examples: list[dict]) -> list[np.ndarray]:
    """Merged CAMs, float32 [H, W, 20] per example (image, labels), in order.

    Images of the same size go through the passes together (`batched_cams`).
    """
    by_size = collections.defaultdict(list)
    for i, example in enumerate(examples):
      by_size[example["image"].shape].append(i)
    out = [None] * len(examples)
    for group in by_size.values():
      cams = batched_cams(self.forward, self.state, [examples[i] for i in group],
                          self.normalization, self.scales, self.pad_multiple)
      for i, cam in zip(group, cams):
        out[i] = cam
    return out

  def labels(self, image: np.ndarray, threshold: float) -> np.ndarray:
    """Image labels at scale 1: uint8 [20] multi-hot, sigmoid > threshold, else top-1.

    The image is padded to a multiple of the stride only: the logits pool over padding.
    """
    x, _ = transforms.pad_to_multiple(transforms.normalize(image, self.normalization),
                                      STRIDE, 0.0)
    x = mesh_lib.pad_batch(x[None], _device_count(self.state))
    logits, _ = self.forward(self.state, jnp.asarray(x))
    probs = np.asarray(jax.nn.sigmoid(logits[0]))
    present = probs > threshold
    if not present.any():
      present[np.argmax(probs)] = True
    return present.astype(np.uint8)


def _device_count(state) -> int:
  return len(jax.tree.leaves(state)[0].sharding.device_set)


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


def multiscale_cams(forward, state, example: dict, normalization: str,
                    scales: tuple[float, ...], pad_multiple: int = 8) -> np.ndarray:
  """The spec's 8-pass CAM of one image: float32 [H, W, 20], each class max-normalised.

  Args:
    forward: from `classifier_forward`.
    state: the classifier's nnx state.
    example: a dataset example (image, labels).
    normalization: the backbone's input normalisation.
    scales: inference scales; every scale runs unflipped and flipped in one call.
    pad_multiple: inputs are padded to a multiple of this (of 8).
  """
  return batched_cams(forward, state, [example], normalization, scales, pad_multiple)[0]


def batched_cams(forward, state, examples: list[dict], normalization: str,
                 scales: tuple[float, ...], pad_multiple: int = 8) -> list[np.ndarray]:
  """`multiscale_cams` of several images of one size, one forward call per scale.

  Each call holds every image unflipped and flipped, [2n, Hp, Wp, 3], padded with zero
  images to a multiple of the devices that `state` is replicated on (`forward` splits
  its batch over them). The merge runs on the host (`merge_present`), over each image's
  present classes only.

  Returns:
    One float32 [H, W, 20] per example, as `multiscale_cams` gives it.
  """
  size = examples[0]["image"].shape[:2]
  if any(e["image"].shape[:2] != size for e in examples):
    raise ValueError("batched_cams takes images of one size")
  passes = [pipeline.multiscale_inputs(e["image"], normalization, scales, flip=True,
                                       multiple=pad_multiple) for e in examples]
  plan = tuple(p for _, p in passes[0])
  multiple = _device_count(state)
  outs = []
  for i in range(0, len(plan), 2):   # Each scale unflipped, then flipped.
    x = np.concatenate([np.concatenate([inputs[i][0], inputs[i + 1][0]])
                        for inputs in passes])
    outs.append(forward(state, jnp.asarray(mesh_lib.pad_batch(x, multiple)))[1])
  outs = [np.asarray(out) for out in outs]   # After all calls are dispatched.
  merged = []
  for b, example in enumerate(examples):
    present = np.flatnonzero(example["labels"])
    cams = [out[2 * b + f][..., present] for out in outs for f in (0, 1)]
    merged.append(full_cams(merge_present(cams, plan, size), present + 1))
  return merged


def merge_present(cams: list[np.ndarray], plan, size: tuple[int, int],
                  stride: int = 8) -> np.ndarray:
  """`ops.cam.merge_cams` of one image's present classes, in NumPy.

  Upsampling k channels on the host costs a few separable matrix products and no
  compile per image size, where the jitted merge of all 20 classes compiled once per
  (H, W) and upsampled the absent classes too.

  Args:
    cams: one float32 [h_i, w_i, k] CAM per pass (the present classes), in plan order.
    plan: the passes (`ops.cam.pass_plan`).
    size: (H, W) of the original image.
    stride: input pixels per CAM cell.

  Returns:
    float32 [H, W, k]: the passes upsampled, un-flipped and summed, each class divided
    by its max + 1e-5.
  """
  if len(cams) != len(plan):
    raise ValueError(f"{len(cams)} CAMs for a plan of {len(plan)} passes")
  h, w = size
  total = np.zeros((cams[0].shape[-1], h, w), np.float32)
  for cam, p in zip(cams, plan):
    rows = _stretch(h, p.size[0] / stride, cam.shape[0])
    cols = _stretch(w, p.size[1] / stride, cam.shape[1])
    if p.flip:
      cols = cols[::-1]
    total += rows @ np.moveaxis(cam.astype(np.float32), -1, 0) @ cols.T
  total /= total.max(axis=(1, 2), keepdims=True) + 1e-5
  return np.ascontiguousarray(np.moveaxis(total, 0, -1))


@functools.lru_cache(maxsize=256)
def _stretch(n_out: int, n_valid: float, n_in: int) -> np.ndarray:
  """float32 [n_out, n_in]: bilinear weights (half-pixel centres, edges clamped, no
  antialiasing, as `ops.cam.upsample_cam`) that stretch the first n_valid of n_in cells
  (fractional n_valid allowed) onto n_out samples."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_valid / n_out - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights.astype(np.float32)


def full_cams(cams: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[H, W, k] maps of label ids `keys` -> [H, W, 20] with zeros for absent classes."""
  out = np.zeros(cams.shape[:2] + (constants.NUM_CLASSES,), np.float32)
  out[..., np.asarray(keys) - 1] = cams
  return out
