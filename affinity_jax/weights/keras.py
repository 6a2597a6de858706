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


def save_h5(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes {`layer/weight`: array} in the keras.applications layout (test fixtures)."""
  import io

  import h5py

  from affinity_jax import io as aio

  layers: dict[str, list[str]] = {}
  for name in arrays:
    layer, weight = name.split("/")
    layers.setdefault(layer, []).append(weight)
  buf = io.BytesIO()
  with h5py.File(buf, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for layer, weights in layers.items():
      g = f.create_group(layer)
      g.attrs["weight_names"] = [f"{layer}/{w}:0".encode() for w in weights]
      for w in weights:
        g.create_dataset(f"{layer}/{w}:0", data=arrays[f"{layer}/{w}"])
  aio.write_bytes(path, buf.getvalue())
