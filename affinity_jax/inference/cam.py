"""The classifier in inference mode: the spec's 8-pass multi-scale CAMs, image labels."""

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import sharding
from affinity_jax.data import transforms
from affinity_jax.inference import STRIDE
from affinity_jax.inference import canvas as canvas_lib
from affinity_jax.inference import resize
from affinity_jax.ops import cam as cam_ops


class Classifier:
  """A trained CAM network: CAMs of images of any sizes, and predicted image labels.

  Args:
    model: a CAM network.
    scales: inference scales; every scale runs unflipped and flipped.
    canvases: the input shapes images are padded onto (`inference.canvas`).
    batch_size: images per forward call (x2 flips); every call of a canvas holds this
      many images (zero images fill the rest), so it compiles once per canvas and scale.
    mesh: optional device mesh the forward splits each batch over (see
      `classifier_forward`).
  """

  def __init__(self, model: nnx.Module, scales: tuple[float, ...],
               canvases: canvas_lib.Canvases = canvas_lib.Canvases(), batch_size: int = 1,
               mesh: jax.sharding.Mesh | None = None):
    self.forward, self.state = classifier_forward(model, mesh)
    self.normalization = model.backbone.normalization
    self.scales = tuple(scales)
    self.canvases = canvases
    self.batch_size = batch_size

  def cams(self, examples: list[dict]) -> list[np.ndarray]:
    """Merged CAMs, float32 [H, W, 20] per example (image, labels), in order.

    Images of the same canvas go through the passes together (`batched_cams`), up to
    `batch_size` at a time.
    """
    by_canvas = collections.defaultdict(list)
    for i, example in enumerate(examples):
      by_canvas[self.canvases.canvas(*example["image"].shape[:2])].append(i)
    out = [None] * len(examples)
    for group in by_canvas.values():
      for start in range(0, len(group), self.batch_size):
        chunk = group[start:start + self.batch_size]
        cams = batched_cams(self.forward, self.state, [examples[i] for i in chunk],
                            self.normalization, self.scales, self.canvases,
                            self.batch_size)
        for i, cam in zip(chunk, cams):
          out[i] = cam
    return out

  def labels(self, image: np.ndarray, threshold: float) -> np.ndarray:
    """Image labels at scale 1: uint8 [20] multi-hot, sigmoid > threshold, else top-1.

    The image is padded to a multiple of the stride only, not onto a canvas: the logits
    pool over the padding. One program per image size (the demo's one image).
    """
    x, _ = transforms.pad_to_multiple(transforms.normalize(image, self.normalization),
                                      STRIDE, 0.0)
    x = sharding.pad_batch(x[None], _device_count(self.state))
    logits, _ = self.forward(self.state, _to_devices(x, self.state))
    probs = np.asarray(jax.nn.sigmoid(logits[0]))
    present = probs > threshold
    if not present.any():
      present[np.argmax(probs)] = True
    return present.astype(np.uint8)


def _device_count(state) -> int:
  return len(jax.tree.leaves(state)[0].sharding.device_set)


def _to_devices(x: np.ndarray, state) -> jax.Array:
  """x placed as the forward of `state` takes it: split over the mesh `state` is
  replicated on, else on the default device. Placed directly, not resharded by a
  program compiled per shape (`jnp.asarray` also compiles one)."""
  placed = jax.tree.leaves(state)[0].sharding
  if isinstance(placed, jax.sharding.NamedSharding):
    return jax.device_put(x, sharding.data_sharding(placed.mesh))
  return jax.device_put(x)


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

  return sharding.jit_over_batch(forward, state, mesh)


def multiscale_inputs(image: np.ndarray, normalization: str,
                      scales: Sequence[float] = cam_ops.SCALES, flip: bool = True,
                      canvases: canvas_lib.Canvases = canvas_lib.Canvases()
                      ) -> list[tuple[np.ndarray, cam_ops.Pass]]:
  """The inference passes of one image, as `ops.cam.pass_plan` lays them out.

  Args:
    image: uint8 [H,W,3].
    normalization: 'imagenet_rgb' or 'caffe_bgr'.
    scales: resize factors (bicubic); (1.0, 0.5, 1.5, 2.0) by default.
    flip: also emit the flipped version of every scale.
    canvases: each pass is zero-padded (bottom/right, after normalisation) to
      `canvases.at_scale` of the image and its scale; by default to a multiple of 8.

  Returns:
    [(input f32 [1,Hp,Wp,3], Pass)], each scale unflipped then (when `flip`) flipped;
    `ops.cam.merge_cams` and `merge_present` take the passes as their plan.
  """
  h, w = image.shape[:2]
  plan = cam_ops.pass_plan(h, w, scales)
  passes, scaled = [], {}
  for p in plan:
    if p.flip and not flip:
      continue
    if p.size not in scaled:
      scaled[p.size] = transforms.normalize(transforms.resize(image, p.size, "bicubic"),
                                            normalization)
    x = scaled[p.size][:, ::-1] if p.flip else scaled[p.size]
    passes.append((canvas_lib.pad_onto(x, canvases.at_scale(h, w, p.scale)), p))
  return passes


def multiscale_cams(forward, state, example: dict, normalization: str,
                    scales: tuple[float, ...],
                    canvases: canvas_lib.Canvases = canvas_lib.Canvases()) -> np.ndarray:
  """The spec's 8-pass CAM of one image: float32 [H, W, 20], each class max-normalised.

  Args:
    forward: from `classifier_forward`.
    state: the classifier's nnx state.
    example: a dataset example (image, labels).
    normalization: the backbone's input normalisation.
    scales: inference scales; every scale runs unflipped and flipped in one call.
    canvases: the input shapes (`inference.canvas`); by default padded to 8.
  """
  return batched_cams(forward, state, [example], normalization, scales, canvases)[0]


def batched_cams(forward, state, examples: list[dict], normalization: str,
                 scales: tuple[float, ...],
                 canvases: canvas_lib.Canvases = canvas_lib.Canvases(),
                 slots: int = 0) -> list[np.ndarray]:
  """`multiscale_cams` of several images of one canvas, one forward call per scale.

  Each call holds every image unflipped and flipped, [2 * max(n, slots), Hc, Wc, 3]
  with zero images after the n given, padded further to a multiple of the devices that
  `state` is replicated on (`forward` splits its batch over them). The merge runs on
  the host (`merge_present`), over each image's present classes only.

  Returns:
    One float32 [H, W, 20] per example, as `multiscale_cams` gives it.
  """
  sizes = [e["image"].shape[:2] for e in examples]
  if len({canvases.canvas(*size) for size in sizes}) != 1:
    raise ValueError("batched_cams takes images of one canvas")
  passes = [multiscale_inputs(e["image"], normalization, scales, True, canvases)
            for e in examples]
  multiple = _device_count(state)
  outs = []
  for i in range(0, len(passes[0]), 2):   # Each scale unflipped, then flipped.
    x = np.concatenate([np.concatenate([inputs[i][0], inputs[i + 1][0]])
                        for inputs in passes])
    x = np.pad(x, [(0, 2 * max(0, slots - len(examples)))] + [(0, 0)] * 3)
    outs.append(forward(state, _to_devices(sharding.pad_batch(x, multiple), state))[1])
  outs = [np.asarray(out) for out in outs]   # After all calls are dispatched.
  merged = []
  for b, (example, inputs, size) in enumerate(zip(examples, passes, sizes)):
    present = np.flatnonzero(example["labels"])
    cams = [out[2 * b + f][..., present] for out in outs for f in (0, 1)]
    plan = [p for _, p in inputs]
    if canvases.exact:
      # psa's merge of unpadded passes: every CAM cell, ceil(Hs / 8) of them, is
      # stretched over the image, as if the CAM covered the scaled image padded to 8.
      plan = [p._replace(size=p.padded) for p in plan]
    merged.append(cam_ops.full_cams(merge_present(cams, plan, size), present + 1))
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
    rows = resize.stretch(h, p.size[0] / stride, cam.shape[0])
    cols = resize.stretch(w, p.size[1] / stride, cam.shape[1])
    if p.flip:
      cols = cols[::-1]
    total += rows @ np.moveaxis(cam.astype(np.float32), -1, 0) @ cols.T
  total /= total.max(axis=(1, 2), keepdims=True) + 1e-5
  return np.ascontiguousarray(np.moveaxis(total, 0, -1))
