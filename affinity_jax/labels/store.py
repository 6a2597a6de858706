"""Compact store of the low/high-alpha CRF marginals: one `<id>.npz` per image.

Format (docs/design.md): `la`, `ha` uint8 [H, W, L] holding round(p * 255), `keys` int32 [L]
the label id of each channel (0 = background first, then the present classes ascending).
Quantisation error is at most 0.5/255 per probability; see docs/evaluation.md for the
measured agreement of the affinity labels with full-precision marginals.

Imports only NumPy, so CRF worker processes stay light.
"""

import os

import numpy as np

from affinity_jax import io
from affinity_jax.errors import UserError


def path(directory: str, image_id: str) -> str:
  return os.path.join(directory, f"{image_id}.npz")


def quantize(p: np.ndarray) -> np.ndarray:
  """float probabilities in [0, 1] -> uint8 round(p * 255)."""
  return np.rint(np.clip(np.asarray(p, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save(directory: str, image_id: str, la: np.ndarray, ha: np.ndarray,
         keys: np.ndarray) -> None:
  """Writes one image's CRF result atomically.

  Args:
    directory: the store folder (`<workdir>/crf`).
    image_id: file stem.
    la, ha: float [H, W, L] marginals (or already-quantised uint8).
    keys: int [L] label id of each channel, 0 first.
  """
  keys = np.asarray(keys, np.int32)
  if la.shape != ha.shape or la.shape[-1] != keys.shape[0] or keys[0] != 0:
    raise ValueError(f"bad CRF result for {image_id}: la {la.shape}, ha {ha.shape}, "
                     f"keys {keys.tolist()}")
  q = lambda a: a if a.dtype == np.uint8 else quantize(a)
  io.save_npz(path(directory, image_id), la=q(la), ha=q(ha), keys=keys)


def load(directory: str, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one image's CRF result.

  Returns:
    (la float32 [H, W, L], ha float32 [H, W, L], keys int32 [L]), probabilities in [0, 1].
  """
  p = path(directory, image_id)
  try:
    with io.open_file(p) as raw, np.load(raw) as z:
      la, ha, keys = z["la"], z["ha"], z["keys"]
  except FileNotFoundError:
    raise UserError(f"{p}: CRF result missing; run the aff_labels stage") from None
  except (KeyError, ValueError, OSError) as e:
    raise UserError(f"{p}: not a CRF store file ({e}); delete it and rerun aff_labels") from None
  scale = np.float32(1.0 / 255.0)
  return la.astype(np.float32) * scale, ha.astype(np.float32) * scale, keys.astype(np.int32)


def exists(directory: str, image_id: str) -> bool:
  return io.exists(path(directory, image_id))
