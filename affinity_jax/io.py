"""Atomic file output (a killed run never leaves a half-written file behind), and the
label PNG reader that matches `save_label_png`.

Every writer goes to a temporary file in the destination folder, flushes and
fsyncs it, then `os.replace`s it onto the final name (atomic on POSIX).
Readers therefore see either the old file, no file, or the whole new file.

A write that fails for want of space or permission (`WRITE_ERRORS`) removes its
temporary file and raises a one-line `UserError` naming the path and the cause
(`write_error`).
"""

import contextlib
import errno
import io
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from affinity_jax.errors import UserError


# Why a write can fail that the user, not the code, must fix.
WRITE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system"}


def write_error(path: str, error: BaseException) -> BaseException:
  """`error`, met while writing `path`, as a one-line `UserError` when it is one of
  `WRITE_ERRORS` (also when wrapped by a library, as its `__cause__` or `__context__`);
  else `error` itself."""
  seen = error
  while seen is not None and not (isinstance(seen, OSError) and seen.errno in WRITE_ERRORS):
    seen = seen.__cause__ or seen.__context__
  if seen is None:
    return error
  return UserError(f"cannot write {path}: {WRITE_ERRORS[seen.errno]} "
                   f"({seen.strerror or seen}); nothing half-written was kept: free space or "
                   "fix the permissions, then run the same command again")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """Turns the `WRITE_ERRORS` of the block, which writes `path`, into `write_error`s."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 -- only the causes above change; others go on.
    converted = write_error(path, e)
    if converted is e:
      raise
    raise converted from None


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file that replaces `path` when the block exits cleanly."""
  directory = os.path.dirname(os.path.abspath(path))
  with writing(path):
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                               suffix=os.path.basename(path))
  try:
    with writing(path):
      os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode.
      with os.fdopen(fd, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a one-object-per-line file (e.g. metrics.jsonl), in order.

  Blank lines and lines that do not parse (the last line of a killed writer) are skipped;
  a missing file gives [].
  """
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line) if line.strip() else None
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """Writes a compressed `.npz` atomically."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes(path, buf.getvalue())


def save_png(path: str, array: np.ndarray, palette: np.ndarray | None = None) -> None:
  """Writes a uint8 image ([H, W] or [H, W, 3]) as PNG, optionally paletted."""
  from PIL import Image  # Local import keeps `import affinity_jax.io` light.

  img = Image.fromarray(np.asarray(array, dtype=np.uint8))
  if palette is not None:
    img = img.convert("P") if img.mode != "L" else img
    img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  write_bytes(path, buf.getvalue())


def save_label_png(path: str, label: np.ndarray) -> None:
  """Writes a label map (0..20, 255) as a PNG with the VOC palette."""
  from affinity_jax import constants

  save_png(path, np.asarray(label).astype(np.uint8), palette=constants.voc_palette())


def read_label_png(path: str) -> np.ndarray:
  """A label map saved as a (palette) PNG -> uint8 [H, W] label ids."""
  from PIL import Image

  try:
    with Image.open(path) as img:
      if img.mode not in ("P", "L"):
        raise UserError(f"{path}: expected a palette or grey label PNG, got mode {img.mode}")
      return np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise UserError(f"{path}: label PNG missing") from None
