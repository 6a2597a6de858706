"""Writers of the weight-file formats the package reads, to make test fixtures.

Each writes {name: array} with the names and layout the original framework would, so
the readers in `affinity_jax.weights` are tested without torch, mxnet or keras.
`nan_model` builds a model to load such a file into.
"""

import io
import pickle
import struct
import zipfile

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import io as aio
from affinity_jax.weights import mxnet
from affinity_jax.weights import pytorch


class _PickleWriter:
  """Emits protocol-2 pickle opcodes for an OrderedDict of tensors by hand, so no
  torch classes are needed to name torch's globals."""

  _STORAGE_NAMES = {np.dtype(v): k for k, v in pytorch._STORAGE_DTYPES.items()
                    if v is not None}

  def __init__(self, legacy: bool):
    self.out, self.legacy = bytearray(b"\x80\x02"), legacy

  def global_(self, module: str, name: str):
    self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

  def str_(self, s: str):
    b = s.encode()
    self.out += b"X" + struct.pack("<I", len(b)) + b

  def int_(self, i: int):
    self.out += b"J" + struct.pack("<i", i)

  def tuple_(self, ints):
    self.out += b"("
    for i in ints:
      self.int_(i)
    self.out += b"t"

  def tensor(self, key: str, arr: np.ndarray):
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out += b"("
    self.out += b"("  # Persistent id tuple.
    self.str_("storage")
    self.global_("torch", self._STORAGE_NAMES[arr.dtype])
    self.str_(key)
    self.str_("cpu")
    self.int_(arr.size)
    if self.legacy:
      self.out += b"N"
    self.out += b"tQ"
    self.int_(0)
    self.tuple_(arr.shape)
    strides = [int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim)]
    self.tuple_(strides)
    self.out += b"\x89"  # requires_grad=False
    self.global_("collections", "OrderedDict")
    self.out += b")R"
    self.out += b"tR"

  def state_dict(self, tensors: dict[str, np.ndarray]) -> bytes:
    self.global_("collections", "OrderedDict")
    self.out += b")R("
    for i, (name, arr) in enumerate(tensors.items()):
      self.str_(name)
      self.tensor(str(i), arr)
    self.out += b"u."
    return bytes(self.out)


def save_state_dict(path: str, tensors: dict[str, np.ndarray], *, legacy: bool = False) -> None:
  """Writes {name: array} as a PyTorch state dict (zip format, or legacy)."""
  tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  data = _PickleWriter(legacy).state_dict(tensors)
  buf = io.BytesIO()
  if legacy:
    for obj in (pytorch._LEGACY_MAGIC, pytorch._LEGACY_PROTOCOL,
                {"protocol_version": pytorch._LEGACY_PROTOCOL, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(obj, buf, protocol=2)
    buf.write(data)
    pickle.dump([str(i) for i in range(len(tensors))], buf, protocol=2)
    for arr in tensors.values():
      buf.write(struct.pack("<q", arr.size))
      buf.write(arr.tobytes())
  else:
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
      zf.writestr("archive/data.pkl", data)
      zf.writestr("archive/version", "3\n")
      for i, arr in enumerate(tensors.values()):
        zf.writestr(f"archive/data/{i}", arr.tobytes())
  aio.write_bytes(path, buf.getvalue())


def save_params(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes {name: array} in the V2 `mx.nd.save` format."""
  flags = {np.dtype(v): k for k, v in mxnet.DTYPES.items()}
  out = [struct.pack("<QQQ", mxnet.LIST_MAGIC, 0, len(arrays))]
  for arr in arrays.values():
    arr = np.asarray(arr, order="C")
    out.append(struct.pack("<IiI", mxnet.V2, 0, arr.ndim)
               + struct.pack(f"<{arr.ndim}q", *arr.shape))
    out.append(struct.pack("<iii", 1, 0, flags[arr.dtype]) + arr.tobytes())
  out.append(struct.pack("<Q", len(arrays)))
  for name in arrays:
    b = name.encode()
    out.append(struct.pack("<Q", len(b)) + b)
  aio.write_bytes(path, b"".join(out))


def save_h5(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes {`layer/weight`: array} in the keras.applications layout."""
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


def nan_model(make):
  """The model `make()` builds, with every float array NaN, for a test that loads all of it.

  Random initialisation is slow on a CPU (ResNet-38's 105M values take ~20 s on 2 cores,
  VGG16's ~10 s), and a loader overwrites it; NaN makes any array it misses show in the
  outputs.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))

  def fill(s):
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    return np.full(s.shape, np.nan if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype)

  return nnx.merge(graphdef, jax.tree.map(fill, state))
