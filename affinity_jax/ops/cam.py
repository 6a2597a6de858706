"""Class activation maps: per-pass CAMs, the multi-scale + flip merge, background score.

Channel c (0..19) of a CAM is VOC label id c + 1. An inference stage runs one jitted
forward per (scale, flip) pass (`pass_plan` gives the input sizes, padded to a multiple
of 8), then merges the 8 per-pass CAMs: `merge_cams` here (jittable, all classes), or
`inference.cam.merge_present` on the host (what the infer_cam stage runs).
"""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import constants

SCALES = (1.0, 0.5, 1.5, 2.0)


class Pass(NamedTuple):
  """One forward pass of the multi-scale inference."""
  scale: float
  flip: bool
  size: tuple[int, int]      # (Hs, Ws): the image resized by `scale`.
  padded: tuple[int, int]    # (Hp, Wp): `size` padded (bottom/right) to a multiple of 8.


def pass_plan(height: int, width: int, scales: Sequence[float] = SCALES,
              stride: int = 8) -> list[Pass]:
  """The passes for an image of height x width: each scale, unflipped then flipped."""
  plan = []
  for s in scales:
    hs, ws = max(1, round(height * s)), max(1, round(width * s))
    padded = (math.ceil(hs / stride) * stride, math.ceil(ws / stride) * stride)
    plan += [Pass(float(s), False, (hs, ws), padded), Pass(float(s), True, (hs, ws), padded)]
  return plan


def cam_from_features(features: jnp.ndarray, weights: jnp.ndarray,
                      sqrt: bool = False) -> jnp.ndarray:
  """CAM_c = relu(w_c . f) at every position (sqrt of that for the VGG variant).

  Args:
    features: [B, h, w, C] backbone features.
    weights: [C, 20] classifier weights (1x1 conv, no bias).
    sqrt: take the square root (the reference's VGG16 CAMs).

  Returns:
    [B, h, w, 20].
  """
  cam = jax.nn.relu(jnp.einsum("bhwc,ck->bhwk", features, weights))
  return jnp.sqrt(cam) if sqrt else cam


def grouped_cams(features: jnp.ndarray, weights: jnp.ndarray,
                 groups: jnp.ndarray) -> jnp.ndarray:
  """CAMs of groups of classes: map_g = sum over classes k of group g of relu(w_k . f).

  Used with an ImageNet classifier's weights to give each VOC class the summed CAMs of
  the ImageNet classes that are a kind of it (`cam.imagenet_prior`).

  Args:
    features: [B, h, w, C] backbone features.
    weights: [C, K] the classifier weights of the K classes that belong to some group.
    groups: [K, G] 0/1, groups[k, g] = 1 when class k belongs to group g.

  Returns:
    [B, h, w, G].
  """
  return jnp.einsum("bhwk,kg->bhwg", cam_from_features(features, weights), groups)


def upsample_cam(cam: jnp.ndarray, size: tuple[int, int],
                 valid_size: tuple[int, int] | None = None, stride: int = 8,
                 flip: bool = False) -> jnp.ndarray:
  """Bilinear upsampling of one pass's CAM to the original image size.

  The CAM of an input padded to a multiple of `stride` covers the padding too; only its
  first valid_size / stride cells show the image, and those are stretched onto `size`
  (half-pixel centres, no antialiasing, like torch's bilinear with align_corners=False).

  Args:
    cam: [B, h, w, K] CAM of one pass.
    size: (H, W) of the original image.
    valid_size: (Hs, Ws) of the resized image before padding; None = h*stride, w*stride.
    stride: input pixels per CAM cell.
    flip: the pass saw the horizontally flipped image; the result is flipped back.

  Returns:
    [B, H, W, K] float32.
  """
  b, h, w, k = cam.shape
  hs, ws = valid_size if valid_size is not None else (h * stride, w * stride)
  scale = jnp.array([size[0] * stride / hs, size[1] * stride / ws], jnp.float32)
  out = jax.image.scale_and_translate(
      cam.astype(jnp.float32), (b, size[0], size[1], k), (1, 2), scale,
      jnp.zeros(2, jnp.float32), method="linear", antialias=False)
  return out[:, :, ::-1] if flip else out


def merge_cams(cams: Sequence[jnp.ndarray], plan: Sequence[Pass], size: tuple[int, int],
               labels: jnp.ndarray, stride: int = 8) -> jnp.ndarray:
  """The multi-scale + flip merge: upsample, mask by the image label, un-flip, sum, and
  divide each class map by its own max (+1e-5).

  Args:
    cams: one [B, h_i, w_i, 20] CAM per pass, in the order of `plan`.
    plan: the passes (`pass_plan(*size)`), static.
    size: (H, W) of the original images.
    labels: [B, 20] multi-hot image labels.

  Returns:
    [B, H, W, 20] float32 in [0, 1); absent classes are 0.
  """
  if len(cams) != len(plan):
    raise ValueError(f"{len(cams)} CAMs for a plan of {len(plan)} passes")
  lab = labels.astype(jnp.float32)[:, None, None, :]
  total = 0.0
  for cam, p in zip(cams, plan):
    total = total + upsample_cam(cam, size, p.size, stride, p.flip) * lab
  return total / (jnp.max(total, axis=(1, 2), keepdims=True) + 1e-5)


def background_score(cams: jnp.ndarray, alpha: float) -> jnp.ndarray:
  """M_bg = (1 - max_c M_c)^alpha. cams: [..., H, W, 20] -> [..., H, W]."""
  return (1.0 - jnp.max(cams, axis=-1)) ** alpha


def with_background(cams: jnp.ndarray, alpha: float) -> jnp.ndarray:
  """[..., 20] -> [..., 21]: the background score as channel 0, then the classes."""
  return jnp.concatenate([background_score(cams, alpha)[..., None], cams], axis=-1)


def cam_label_map(cams: jnp.ndarray, bg_threshold: float) -> jnp.ndarray:
  """Label map from CAMs with a constant background score (CAM-only evaluation).

  Args:
    cams: [..., H, W, 20] merged CAMs.
    bg_threshold: the constant score of the background.

  Returns:
    uint8 [..., H, W]: argmax over [bg_threshold, cams] -> 0 (background) .. 20.
  """
  bg = jnp.full(cams.shape[:-1] + (1,), bg_threshold, cams.dtype)
  return jnp.argmax(jnp.concatenate([bg, cams], axis=-1), axis=-1).astype(jnp.uint8)


def full_cams(cams: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[H, W, k] maps of label ids `keys` -> [H, W, 20] with zeros for absent classes.

  NumPy, on the host: stored CAMs keep only the present classes (`Workdir.cams`).
  """
  out = np.zeros(cams.shape[:2] + (constants.NUM_CLASSES,), np.float32)
  out[..., np.asarray(keys) - 1] = cams
  return out
