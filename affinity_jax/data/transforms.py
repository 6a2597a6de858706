"""NumPy augmentations and the spec's 1/8 label map; pure host functions on one example.

Randomness comes from an explicit `np.random.Generator` (grain hands one per
record), so every function here is deterministic given its generator. Joint
transforms draw their randomness once and apply it to the image and to every
aligned map (masks, CRF marginals).
"""

import numpy as np
from PIL import Image, ImageEnhance

from affinity_jax import constants

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_BGR_MEAN = np.array([104.008, 116.669, 122.675], np.float32)
NORMALIZATIONS = ("imagenet_rgb", "caffe_bgr")


def normalize(image: np.ndarray, normalization: str) -> np.ndarray:
  """uint8 RGB [H,W,3] -> float32 [H,W,3] as the backbone expects.

  'imagenet_rgb': (RGB/255 - mean) / std; 'caffe_bgr': BGR - the Caffe BGR mean.
  """
  # In place on one new array: the same operations in the same order as
  # `(x / 255 - mean) / std`, so the same bits, without its temporaries (3x faster).
  if normalization == "imagenet_rgb":
    x = image.astype(np.float32)
    x /= 255.0
    x -= IMAGENET_MEAN
    x /= IMAGENET_STD
    return x
  if normalization == "caffe_bgr":
    x = image[..., ::-1].astype(np.float32)
    x -= CAFFE_BGR_MEAN
    return x
  raise ValueError(f"unknown normalization {normalization!r}, expected {NORMALIZATIONS}")


def scaled_long_side_range(crop_size: int, base=(256, 512), base_crop: int = 448):
  """The long-side resize range for `crop_size`, scaled from the spec's (256, 512) at 448."""
  return (max(1, round(base[0] * crop_size / base_crop)),
          max(1, round(base[1] * crop_size / base_crop)))


def resize(array: np.ndarray, size_hw: tuple[int, int], method: str) -> np.ndarray:
  """Resizes uint8 [H,W] / [H,W,3] or float32 [H,W] / [H,W,C] with PIL.

  Args:
    array: the array to resize.
    size_hw: output (height, width).
    method: 'bicubic', 'nearest' or 'bilinear'.
  """
  h, w = size_hw
  if array.shape[:2] == (h, w):
    return array
  resample = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
              "bilinear": Image.BILINEAR}[method]
  if array.ndim == 3 and array.dtype != np.uint8:
    return np.stack([resize(array[..., c], size_hw, method) for c in range(array.shape[2])], -1)
  return np.asarray(Image.fromarray(array).resize((w, h), resample))


def long_side_size(h: int, w: int, long_side: int) -> tuple[int, int]:
  """(H', W') with max(H', W') = long_side and the aspect ratio kept."""
  scale = long_side / max(h, w)
  return max(1, round(h * scale)), max(1, round(w * scale))


def colour_jitter(image: np.ndarray, rng: np.random.Generator, brightness=0.3,
                  contrast=0.3, saturation=0.3, hue=0.1) -> np.ndarray:
  """Random brightness/contrast/saturation factors in [1-x, 1+x] and hue shift in
  [-hue, hue] (fraction of the colour circle), applied in random order. uint8 [H,W,3]."""
  img = Image.fromarray(image)
  factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
             rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
  for op in rng.permutation(4):
    if op == 0:
      img = ImageEnhance.Brightness(img).enhance(factors[0])
    elif op == 1:
      img = ImageEnhance.Contrast(img).enhance(factors[1])
    elif op == 2:
      img = ImageEnhance.Color(img).enhance(factors[2])
    elif (shift := int(round(factors[3] * 255))) != 0:
      # PIL's 8-bit HSV round trip itself changes values by a few levels: skip it for no shift.
      hsv = np.array(img.convert("HSV"))
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
      img = Image.fromarray(hsv, "HSV").convert("RGB")
  return np.asarray(img)


def random_crop_box(h: int, w: int, size: int, rng: np.random.Generator):
  """Draws a size x size window over an h x w array (placed at random when smaller).

  Returns:
    (src, dst): pairs of slices; `out[dst] = array[src]` where `out` is the
    size x size output filled with the padding value.
  """
  def one(n):
    if n >= size:
      start = int(rng.integers(0, n - size + 1))
      return slice(start, start + size), slice(0, size)
    start = int(rng.integers(0, size - n + 1))
    return slice(0, n), slice(start, start + n)
  (sy, dy), (sx, dx) = one(h), one(w)
  return (sy, sx), (dy, dx)


def apply_crop(array: np.ndarray, box, size: int, fill) -> np.ndarray:
  """Crops `array` [H,W,...] with a box from `random_crop_box`, padding with `fill`."""
  src, dst = box
  out = np.full((size, size) + array.shape[2:], fill, array.dtype)
  out[dst] = array[src]
  return out


def pad_to_multiple(array: np.ndarray, multiple: int, fill=0):
  """Pads [H,W,...] at the bottom and right to multiples of `multiple`.

  Returns:
    (padded array, (pad_bottom, pad_right)).
  """
  h, w = array.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  pads = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
  return np.pad(array, pads, constant_values=fill), (ph, pw)


def label_map_from_crf(la: np.ndarray, ha: np.ndarray, keys: np.ndarray,
                       stride: int = 8) -> np.ndarray:
  """The spec's affinity label map from cropped CRF marginals.

  Args:
    la: low-alpha CRF probabilities [S,S,L] float32, zeros where the crop padded.
    ha: high-alpha CRF probabilities [S,S,L] float32, zeros where the crop padded.
    keys: [L] int, the label id of each channel (keys[0] = 0, background).
    stride: pooling window (S must be a multiple).

  Returns:
    [S/stride, S/stride] uint8: keys[argmax(la)], 255 where la's argmax is
    background, 0 where ha's argmax is background, 255 where the pooled la has
    no score (max <= 1e-5, i.e. crop padding).
  """
  s0, s1, n = la.shape
  assert s0 % stride == 0 and s1 % stride == 0, (la.shape, stride)
  pool = lambda x: x.reshape(s0 // stride, stride, s1 // stride, stride, n).mean(axis=(1, 3))
  la_p, ha_p = pool(la), pool(ha)
  keys = np.asarray(keys)
  label = keys[np.argmax(la_p, -1)].astype(np.uint8)
  label[keys[np.argmax(la_p, -1)] == 0] = constants.IGNORE
  label[keys[np.argmax(ha_p, -1)] == 0] = 0
  label[la_p.max(-1) <= 1e-5] = constants.IGNORE
  return label
