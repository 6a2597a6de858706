"""PyTorch state-dict files (`.pth`) read into NumPy without importing torch.

Both container formats are handled:
- zip (torch >= 1.6): `<prefix>/data.pkl` plus one raw file per storage in
  `<prefix>/data/<key>`;
- legacy (older torch): a stream of pickles (magic number, protocol version,
  system info, the object, the list of storage keys) followed by each storage
  as an int64 element count and its raw bytes.

Unpickling is restricted to the handful of globals a state dict needs
(OrderedDict, the tensor rebuild functions and storage types); anything else is
refused, so a file cannot run code.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

from affinity_jax.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": None,  # Decoded by hand below.
}


class _Storage:
  """A storage named in the pickle; its bytes arrive later (legacy) or from the zip."""

  def __init__(self, key: str, type_name: str):
    self.key, self.type_name, self.data = key, type_name, None

  def array(self) -> np.ndarray:
    raw = self.data
    if self.type_name == "BFloat16Storage":
      u16 = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
      return u16.view(np.float32)
    return np.frombuffer(raw, _STORAGE_DTYPES[self.type_name])

  @property
  def itemsize(self) -> int:
    return 2 if self.type_name == "BFloat16Storage" else np.dtype(_STORAGE_DTYPES[self.type_name]).itemsize


class _TensorRef:
  """A tensor to rebuild once its storage's bytes are known."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array()
    if not self.size:
      return np.array(flat[self.offset])
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


class _Global:
  def __init__(self, name):
    self.name = name


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, f, path, storages, zip_reader=None):
    super().__init__(f)
    self.path, self.storages, self.zip_reader = path, storages, zip_reader

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _Global(name)
    raise UserError(f"{self.path}: refusing to unpickle {module}.{name} (not a plain state dict)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or pid[0] != "storage":
      raise UserError(f"{self.path}: unknown persistent id {pid!r}")
    _, storage_type, key, _location, _numel, *view = pid
    key = str(key)
    if key not in self.storages:
      st = _Storage(key, storage_type.name)
      if self.zip_reader is not None:
        st.data = self.zip_reader(key)
      self.storages[key] = st
    if view and view[0] is not None:
      raise UserError(f"{self.path}: storage views (pre-0.4 files) are not supported")
    return self.storages[key]


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _TensorRef):
    return obj.materialize()
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise UserError(f"{path}: zip file without data.pkl, not a PyTorch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    reader = lambda key: zf.read(f"{prefix}data/{key}")
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), path, storages, reader).load()
  return obj


def _load_legacy(path: str, f: BinaryIO) -> Any:
  plain = lambda: _Unpickler(f, path, {}).load()
  if plain() != _LEGACY_MAGIC:
    raise UserError(f"{path}: not a PyTorch file (bad magic number)")
  if plain() != _LEGACY_PROTOCOL:
    raise UserError(f"{path}: unsupported legacy PyTorch protocol version")
  sys_info = plain()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise UserError(f"{path}: big-endian PyTorch files are not supported")
  storages: dict[str, _Storage] = {}
  obj = _Unpickler(f, path, storages).load()
  keys = plain()
  for key in keys:
    st = storages[str(key)]
    (numel,) = struct.unpack("<q", f.read(8))
    st.data = f.read(numel * st.itemsize)
    if len(st.data) != numel * st.itemsize:
      raise UserError(f"{path}: file is truncated (storage {key})")
  return obj


def _storage_from_bytes(path: str, data: bytes) -> _Storage:
  """A storage that `pickle` wrote as `torch.storage._load_from_bytes(data)`: `data` is a
  whole `torch.save` file (legacy or zip) holding just the storage."""
  try:
    if zipfile.is_zipfile(io.BytesIO(data)):
      with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
          raise UserError(f"{path}: embedded tensor data without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), path, {},
                         lambda key: zf.read(f"{prefix}data/{key}")).load()
    else:
      obj = _load_legacy(path, io.BytesIO(data))
  except UserError:
    raise
  except Exception as e:  # Malformed pickles raise many different types.
    raise UserError(f"{path}: unreadable embedded tensor ({type(e).__name__}: {e})") from e
  if not isinstance(obj, _Storage) or obj.data is None:
    raise UserError(f"{path}: embedded tensor data is not a plain storage")
  return obj


def pickled_tensor_globals(path: str) -> dict[tuple[str, str], Any]:
  """Torch-free stand-ins for the globals of CPU tensors pickled with plain `pickle`
  (not `torch.save`), e.g. inside a dict that `np.save` wrote.

  Such a tensor is `torch._utils._rebuild_tensor_v2(storage, ...)` with the storage as
  `torch.storage._load_from_bytes(<a torch.save file>)`; the stand-ins read that file
  with this module's restricted unpickler. Pass what the unpickler returns through
  `materialize`, which turns the tensors into NumPy arrays.

  Args:
    path: the file being read, for error messages.

  Returns:
    {(module, name): callable} for a restricted unpickler's `find_class`.
  """
  return {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch.storage", "_load_from_bytes"): lambda data: _storage_from_bytes(path, data),
      ("collections", "OrderedDict"): collections.OrderedDict,
  }


def materialize(obj: Any) -> Any:
  """`obj` with every tensor that `pickled_tensor_globals` rebuilt as a NumPy array."""
  return _materialize(obj)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as {name: array} (no torch needed).

  Accepts a bare state dict or a checkpoint dict holding one under
  `state_dict` / `model`; a `module.` prefix (DataParallel) is stripped.
  """
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      with open(path, "rb") as f:
        obj = _load_legacy(path, f)
  except UserError:
    raise
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
  except Exception as e:  # Malformed pickles raise many different types.
    raise UserError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
  obj = _materialize(obj)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise UserError(f"{path}: does not hold a state dict of tensors")
  return {k.removeprefix("module."): v for k, v in obj.items()}
