"""Keras HDF5 weight files (`model.save_weights` / keras.applications layout), via h5py.

Layer groups hold `<layer>/<weight>` datasets, e.g. VGG16's
`block1_conv1/block1_conv1/kernel:0` (HWIO) and `.../bias:0`. Names come back
as `<layer>/<weight>` with any `:0` suffix dropped, e.g. `block1_conv1/kernel`.
"""

import numpy as np

from affinity_jax.errors import UserError


def load_h5(path: str) -> dict[str, np.ndarray]:
  """Reads every weight array of a Keras .h5 file as {`layer/weight`: array}."""
  import h5py

  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise UserError(f"{path}: not a readable HDF5 file ({e})") from e
  out = {}
  with f:
    root = f["model_weights"] if "model_weights" in f else f

    def visit(name, obj):
      if isinstance(obj, h5py.Dataset):
        parts = name.split("/")
        layer, weight = parts[0], parts[-1].split(":")[0]
        out[f"{layer}/{weight}"] = np.asarray(obj)

    root.visititems(visit)
  if not out:
    raise UserError(f"{path}: HDF5 file holds no weights")
  return out
