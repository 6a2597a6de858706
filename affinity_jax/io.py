"""The one path layer: atomic file output (a killed run never leaves a half-written file
behind) on a local disk or in a bucket, and the readers that match the writers.

A path is a local path or a URL (`gs://bucket/run/...`, any `fsspec` protocol); URLs
go through `etils.epath` (gcsfs for `gs://`), imported only when one is used.

Every local writer goes to a temporary file in the destination folder, flushes and
fsyncs it, then `os.replace`s it onto the final name (atomic on POSIX). A bucket has no
rename, but an object appears whole or not at all: a remote writer builds the file in
memory and uploads it in one call. Readers therefore see either the old file, no
file, or the whole new file. Objects cannot be appended to: `Appender` keeps a growing
log in memory and uploads it whole at `sync`.

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
import time
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


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return "://" in os.fspath(path)


def _epath(path: str):
  from etils import epath  # Imported for URLs only: local runs stay light.

  import fsspec
  for protocol in ("gs", "gcs"):
    # Listings are not cached: other processes write the same folders (DONE markers).
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
  return epath.Path(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Makes folder `path` and its parents (a no-op in a bucket, which has no folders)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in folder `path` ([] when it does not exist)."""
  if is_remote(path):
    folder = _epath(path)
    return [p.name for p in folder.iterdir()] if folder.exists() else []
  return os.listdir(path) if os.path.isdir(path) else []


def remove(path: str) -> None:
  """Deletes file `path` if it exists."""
  with contextlib.suppress(FileNotFoundError):
    _epath(path).unlink() if is_remote(path) else os.remove(path)


def open_file(path: str, mode: str = "rb") -> Any:
  """Opens `path` for reading (a local file or an object)."""
  return _epath(path).open(mode) if is_remote(path) else open(path, mode)


def abspath(path: str) -> str:
  """`path` made absolute (URLs are already)."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file that replaces `path` when the block exits cleanly (in a
  bucket: a buffer uploaded whole when the block exits cleanly)."""
  if is_remote(path):
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    data = buffer.getvalue()
    with writing(path):
      target = _epath(path)
      target.write_bytes(data) if "b" in mode else target.write_text(data)
    return
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


def read_text(path: str) -> str:
  with open_file(path, "r") as f:
    return f.read()


class Appender:
  """A text file that grows by `write` (e.g. metrics.jsonl).

  On a local disk, appended to and flushed at each `write`. In a bucket, which cannot
  append, the whole text is kept in memory (starting from what `path` holds) and
  uploaded at `sync` and `close`, and by `write` at most every `upload_every` seconds
  (a bucket takes about one update per second per object).
  """

  def __init__(self, path: str, upload_every: float = 10.0):
    self.path = path
    self._remote = is_remote(path)
    with writing(path):
      if self._remote:
        self._text = [read_text(path)] if exists(path) else []
        self._every, self._uploaded = upload_every, time.monotonic()
      else:
        self._file = open(path, "a")

  def write(self, text: str) -> None:
    with writing(self.path):
      if not self._remote:
        self._file.write(text)
        self._file.flush()
        return
      self._text.append(text)
      if time.monotonic() - self._uploaded >= self._every:
        self.sync()

  def sync(self) -> None:
    """Makes every line written so far visible at `path`."""
    if self._remote:
      write_text(self.path, "".join(self._text))
      self._uploaded = time.monotonic()

  def close(self) -> None:
    if self._remote:
      self.sync()
    else:
      self._file.close()


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a one-object-per-line file (e.g. metrics.jsonl), in order.

  Blank lines and lines that do not parse (the last line of a killed writer) are skipped;
  a missing file gives [].
  """
  if not exists(path):
    return []
  rows = []
  with open_file(path, "r") as f:
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
    with open_file(path, "rb") as f, Image.open(f) as img:
      if img.mode not in ("P", "L"):
        raise UserError(f"{path}: expected a palette or grey label PNG, got mode {img.mode}")
      return np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise UserError(f"{path}: label PNG missing") from None
