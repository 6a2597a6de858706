"""Other methods' CAM files: read psa, IRN and plain `.npz` CAMs, write them back.

One file per image, named by image id (docs/interop.md):

| format | file | holds |
|---|---|---|
| `psa` | `<id>.npy` | a pickled dict {class index 0..19: float [H, W] CAM} (psa's `infer_cls.py --out_cam`; SEAM, AdvCAM and others feed this to psa's `infer_aff.py`) |
| `irn` | `<id>.npy` | a pickled dict with `keys` (class indices [k]) and `high_res` (float [k, H, W]); IRN's `cam_out` (its `cam` entry, a stride-4 torch tensor, is read and ignored) |
| `npz` | `<id>.npz` | `keys` int [k] class indices 0..19, `cams` float [k, H, W] |

Class index c is VOC label id c + 1 (`docs/design.md`); every format holds the CAMs of
the image's present classes only, each normalised to [0, 1] by its maximum.

The `.npy` files of psa and IRN are pickles, and unpickling can run code. They are read
with a restricted unpickler that builds only NumPy arrays and scalars, the dicts, lists
and numbers of the pickle protocol itself, and torch CPU tensors rebuilt as NumPy arrays
without torch (`weights.pytorch.pickled_tensor_globals`); any other global is refused
with a one-line `UserError` before anything is called.

Imports only NumPy (and the torch-free tensor reader).
"""

import io as _io
import os
import pickle
from typing import Any

import numpy as np

from affinity_jax import io
from affinity_jax.errors import UserError
from affinity_jax.weights import pytorch

FORMATS = ("psa", "irn", "npz")
NUM_CLASSES = 20
# Values up to this far outside [0, 1] are rounding (float16 stores, a max + 1e-5
# divisor); they are clipped. Further out is an error.
_SLACK = 1e-3


def suffix(fmt: str) -> str:
  """The file suffix of format `fmt`."""
  return ".npz" if checked_format(fmt) == "npz" else ".npy"


def checked_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise UserError(f"CAM format {fmt!r}: expected one of {', '.join(FORMATS)}")
  return fmt


def path(directory: str, image_id: str, fmt: str) -> str:
  return os.path.join(directory, image_id + suffix(fmt))


# ---------------------------------------------------------------- restricted unpickling

def _encode_latin1(text, encoding="latin1"):
  """Protocol-2 pickles of bytes call `_codecs.encode(text, 'latin1')`."""
  if encoding != "latin1" or not isinstance(text, str):
    raise pickle.UnpicklingError("_codecs.encode with other than a latin1 string")
  return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """What pickles of NumPy arrays and scalars name, under NumPy 1's and 2's module names."""
  out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
         ("_codecs", "encode"): _encode_latin1}
  multiarray = np.ndarray.__reduce__(np.zeros(1))[0]           # _reconstruct
  scalar = np.float32(0).__reduce__()[0]                       # multiarray.scalar
  for core in ("numpy.core", "numpy._core"):
    out[(f"{core}.multiarray", "_reconstruct")] = multiarray
    out[(f"{core}.multiarray", "scalar")] = scalar
    out[(f"{core}.numeric", "_frombuffer")] = _frombuffer
  return out


def _frombuffer(buffer, dtype, shape, order):
  """Protocol-5 pickles of arrays: `numpy.core.numeric._frombuffer`."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError("_frombuffer of an object dtype")
  return np.frombuffer(buffer, dtype).reshape(shape, order=order)


class _Unpickler(pickle.Unpickler):
  """Builds only NumPy arrays and scalars, torch CPU tensors (as NumPy), dicts, lists,
  numbers and strings; any other global is refused before it is called."""

  def __init__(self, f, path_: str):
    super().__init__(f)
    self.path = path_
    self.allowed = {**_numpy_globals(), **pytorch.pickled_tensor_globals(path_)}

  def find_class(self, module, name):
    if (module, name) in self.allowed:
      return self.allowed[(module, name)]
    raise UserError(f"{self.path}: refusing to unpickle {module}.{name} (a CAM file holds "
                    "only NumPy arrays, dicts and numbers)")

  def persistent_load(self, pid):
    raise UserError(f"{self.path}: refusing a pickle with persistent ids (not a CAM file)")


def load_npy(path_: str) -> Any:
  """A `.npy` file's content, its pickle (object arrays) read by the restricted
  unpickler: a plain array, or the object a 0-d object array holds (e.g. a dict).

  Raises:
    UserError: unreadable, not a `.npy` file, or a pickle naming anything but NumPy
      arrays, torch tensors, dicts and numbers (one line naming the file).
  """
  from numpy.lib import format as npformat
  try:
    with open(path_, "rb") as f:
      version = npformat.read_magic(f)
      if version == (1, 0):
        _, _, dtype = npformat.read_array_header_1_0(f)
      elif version == (2, 0):
        _, _, dtype = npformat.read_array_header_2_0(f)
      else:
        raise UserError(f"{path_}: .npy format version {version} is not supported")
      if not dtype.hasobject:
        f.seek(0)
        return np.load(f, allow_pickle=False)
      obj = _Unpickler(f, path_).load()
  except UserError:
    raise
  except FileNotFoundError:
    raise UserError(f"{path_}: CAM file missing") from None
  except OSError as e:
    raise UserError(f"{path_}: cannot read ({e.strerror or e})") from None
  except Exception as e:  # Malformed pickles and headers raise many different types.
    raise UserError(f"{path_}: not a readable .npy file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return pytorch.materialize(obj.item() if isinstance(obj, np.ndarray) and obj.ndim == 0
                             else obj)


# ---------------------------------------------------------------- reading

def _class_indices(path_: str, keys: Any) -> np.ndarray:
  try:
    arr = np.asarray(keys)
  except Exception:  # noqa: BLE001 -- anything not array-like.
    arr = np.asarray([[]], object)
  if arr.ndim == 1 and arr.size == 0:
    raise UserError(f"{path_}: holds no CAMs (an image has at least one class)")
  if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)
                           or (arr.dtype == object and all(
                               isinstance(k, (int, np.integer)) for k in arr))):
    raise UserError(f"{path_}: class indices {keys!r} are not integers")
  arr = arr.astype(np.int64)
  bad = [int(k) for k in arr if not 0 <= k < NUM_CLASSES]
  if bad:
    raise UserError(f"{path_}: unknown class index {bad[0]} (expected 0..{NUM_CLASSES - 1}, "
                    "class index c is VOC label id c + 1)")
  if len(set(arr.tolist())) != len(arr):
    raise UserError(f"{path_}: class indices {arr.tolist()} repeat")
  return arr


def _stack(path_: str, maps: list[Any]) -> np.ndarray:
  arrays = []
  for m in maps:
    a = np.asarray(m)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.integer)):
      raise UserError(f"{path_}: a CAM has dtype {a.dtype}, expected floats")
    arrays.append(a)
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise UserError(f"{path_}: CAMs of shapes {sorted(shapes)}; expected one H x W for "
                    "every class")
  return np.stack(arrays).astype(np.float32)


def _parse(path_: str, fmt: str) -> tuple[np.ndarray, np.ndarray]:
  """(class indices [k], CAMs float32 [k, H, W]) of one file, structure checked."""
  if fmt == "npz":
    try:
      with np.load(path_, allow_pickle=False) as z:
        if "keys" not in z or "cams" not in z:
          raise UserError(f"{path_}: an npz CAM file holds `keys` and `cams` (has "
                          f"{sorted(z.files)})")
        keys, cams = z["keys"], z["cams"]
    except UserError:
      raise
    except FileNotFoundError:
      raise UserError(f"{path_}: CAM file missing") from None
    except Exception as e:  # noqa: BLE001 -- zip, header and pickle errors alike.
      raise UserError(f"{path_}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if np.ndim(cams) != 3:
      raise UserError(f"{path_}: `cams` has shape {np.shape(cams)}, expected [k, H, W]")
    indices = _class_indices(path_, keys)
    maps = list(cams)
  else:
    obj = load_npy(path_)
    if not isinstance(obj, dict):
      raise UserError(f"{path_}: holds a {type(obj).__name__}, expected the dict of a "
                      f"{fmt} CAM file")
    if fmt == "psa":
      if any(isinstance(k, str) for k in obj):
        hint = " (an IRN file? use --format=irn)" if "high_res" in obj else ""
        raise UserError(f"{path_}: keys {sorted(map(str, obj))} are not class indices{hint}")
      indices = _class_indices(path_, list(obj))
      maps = list(obj.values())
    else:
      if "keys" not in obj or "high_res" not in obj:
        hint = " (a psa file? use --format=psa)" if obj and all(
            isinstance(k, (int, np.integer)) for k in obj) else ""
        raise UserError(f"{path_}: an IRN CAM file holds `keys` and `high_res` (has "
                        f"{sorted(map(str, obj))}){hint}")
      indices = _class_indices(path_, obj["keys"])
      high = np.asarray(obj["high_res"])
      if high.ndim != 3 or high.shape[0] != len(indices):
        raise UserError(f"{path_}: `high_res` has shape {high.shape} for {len(indices)} "
                        "keys; expected [k, H, W]")
      maps = list(high)
  if len(maps) != len(indices):
    raise UserError(f"{path_}: {len(maps)} CAMs for {len(indices)} class indices")
  return indices, _stack(path_, maps)


def read(path_: str, fmt: str, size: tuple[int, int] | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
  """One image's CAMs from another method's file, checked.

  Args:
    path_: the file.
    fmt: `psa`, `irn` or `npz`.
    size: (H, W) of the image; the CAMs must have it.

  Returns:
    (cams float32 [H, W, k] in [0, 1], keys int32 [k] their VOC label ids, ascending):
    what `workdir.CamStore.save` takes.

  Raises:
    UserError: one line naming the file: missing, unreadable or refused (see
      `load_npy`), empty, unknown or repeated class indices, CAMs of different shapes
      or not of `size`, NaN or infinite values, values outside [0, 1].
  """
  indices, cams = _parse(path_, checked_format(fmt))
  return _checked(path_, indices, cams, size)


def from_dict(cams: dict, size: tuple[int, int] | None = None, where: str = "cams"
              ) -> tuple[np.ndarray, np.ndarray]:
  """`read` of a psa-style dict in memory: {class index 0..19: float [H, W] CAM}.

  Args:
    cams: the dict.
    size: (H, W) of the image; the CAMs must have it.
    where: what to name in errors.

  Returns:
    (cams float32 [H, W, k], keys int32 [k] VOC label ids, ascending), checked as `read`
    checks a file.
  """
  if not isinstance(cams, dict):
    raise UserError(f"{where}: a {type(cams).__name__}, expected a dict {{class index: "
                    "H x W CAM}")
  indices = _class_indices(where, list(cams))
  return _checked(where, indices, _stack(where, list(cams.values())), size)


def _checked(where: str, indices: np.ndarray, cams: np.ndarray,
             size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
  """The checks of `read` on (class indices [k], CAMs [k, H, W]); the store's layout."""
  if size is not None and cams.shape[1:] != tuple(size):
    raise UserError(f"{where}: CAMs are {cams.shape[1]}x{cams.shape[2]} (H x W) but the "
                    f"image is {size[0]}x{size[1]}")
  if not np.isfinite(cams).all():
    bad = int(np.count_nonzero(~np.isfinite(cams)))
    raise UserError(f"{where}: {bad} CAM values are NaN or infinite")
  low, high = float(cams.min()), float(cams.max())
  if low < -_SLACK or high > 1 + _SLACK:
    raise UserError(f"{where}: CAM values span [{low:.4g}, {high:.4g}]; expected each "
                    "class normalised to [0, 1] by its maximum, as psa and IRN write them")
  order = np.argsort(indices)
  cams = np.clip(cams[order], 0.0, 1.0)
  return (np.ascontiguousarray(np.moveaxis(cams, 0, -1)),
          (indices[order] + 1).astype(np.int32))


# ---------------------------------------------------------------- writing

def write(path_: str, fmt: str, cams: np.ndarray, keys: np.ndarray) -> None:
  """Writes one image's CAMs in format `fmt`, atomically.

  Args:
    path_: the file (`path(directory, image_id, fmt)`).
    fmt: `psa` (a dict {class index: float32 [H, W]}, as psa's `infer_cls.py` saves it),
      `irn` (a dict with `keys` int64 class indices and `high_res` float32 [k, H, W];
      without IRN's stride-4 `cam`, which its later steps do not read from this file)
      or `npz` (`keys` int32 class indices, `cams` float32 [k, H, W]).
    cams: float [H, W, k], as the workdir's CAM store holds them.
    keys: int [k] their VOC label ids (1..20).
  """
  keys = np.asarray(keys, np.int64)
  maps = np.moveaxis(np.asarray(cams, np.float32), -1, 0)
  indices = keys - 1
  fmt = checked_format(fmt)
  if fmt == "npz":
    io.save_npz(path_, keys=indices.astype(np.int32), cams=maps)
    return
  if fmt == "psa":
    obj = {int(c): np.ascontiguousarray(m) for c, m in zip(indices, maps)}
  else:
    obj = {"keys": indices, "high_res": np.ascontiguousarray(maps)}
  buf = _io.BytesIO()
  np.save(buf, np.array(obj, dtype=object), allow_pickle=True)
  io.write_bytes(path_, buf.getvalue())
