"""Bilinear resizing on the host as matrix products: no program compiled per size.

`stretch` gives the weights of `jax.image.resize`'s bilinear upsampling (half-pixel
centres, edges clamped, no antialiasing) as a matrix, so resizing an [h, w, C] map is
`rows @ map @ cols.T` in NumPy.
"""

import functools

import numpy as np


@functools.lru_cache(maxsize=256)
def stretch(n_out: int, n_valid: float, n_in: int) -> np.ndarray:
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
