"""The workdir's layout: every folder name lives here, each artefact behind one store.

  workdir/
    lock                        who runs in it (`lock`): host, pid, since when
    config.json                 the resolved config (written by `config_lib`)
    tfds/                       prepared datasets (unless data.data_dir is set)
    cam/ aff/ seg/              `checkpoints(kind)`: ckpt/ and metrics.jsonl of `loop.train`
    cam_maps/<id>.npz           `cams`: merged multi-scale CAMs of the present classes
    crf/<id>.npz                `crf`: low/high-alpha CRF marginals (`labels.store` format)
    rw/<id>.png                 `rw`: random-walk pseudo labels, VOC palette
    rw_crf/<id>.png             `rw_crf`: the same after a dense CRF
    eval/                       `reports`: results.json, results.md, plots

A per-image store is finished when its folder holds `DONE-<process index>`: each host
writes its own share of the images and then its own marker.

One run writes a workdir at a time: it holds `lock` (see `lock`) from before its first
write to its end; on several hosts, process 0 holds it for all.

Imports only NumPy at the top (orbax when a checkpoint is read), so the input
pipeline's worker processes, which unpickle the stores' `load`, stay light.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import time

import numpy as np

from affinity_jax import config_lib
from affinity_jax import io
from affinity_jax.errors import UserError
from affinity_jax.labels import store as crf_format

CONFIG = config_lib.CONFIG_FILE
LOCK = "lock"
_TRIES = 5  # `lock` tries this often, 50 ms apart, before it refuses.
DATASETS = "tfds"
CHECKPOINT = "ckpt"         # In a training folder: what `training.loop` writes there,
METRICS = "metrics.jsonl"  # the checkpoints and the metrics log.
KINDS = ("cam", "aff", "seg")


class PerImage:
  """A folder with one file `<id><suffix>` per image and a DONE marker per process."""
  folder = ""
  suffix = ""

  def __init__(self, root: str, process_index: int = 0):
    self.directory = os.path.join(root, self.folder)
    self._marker = os.path.join(self.directory, f"DONE-{process_index}")

  def path(self, image_id: str) -> str:
    return os.path.join(self.directory, image_id + self.suffix)

  def exists(self, image_id: str) -> bool:
    return os.path.exists(self.path(image_id))

  def finished(self) -> bool:
    """Whether this process wrote all its files (see `mark_finished`)."""
    return os.path.exists(self._marker)

  def mark_finished(self) -> None:
    """Records that every file of this process is written (a killed run has none)."""
    io.write_text(self._marker, "")


class CamStore(PerImage):
  """`cam_maps/<id>.npz`: `cams` float16 [H, W, k], `keys` int32 [k] their label ids."""
  folder = "cam_maps"
  suffix = ".npz"

  def save(self, image_id: str, cams: np.ndarray, keys: np.ndarray) -> None:
    io.save_npz(self.path(image_id), cams=cams.astype(np.float16),
                keys=np.asarray(keys, np.int32))

  def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (cams float32 [H, W, k], keys int32 [k])."""
    path = self.path(image_id)
    try:
      with np.load(path) as f:
        return f["cams"].astype(np.float32), f["keys"]
    except (OSError, KeyError, ValueError) as e:
      raise UserError(f"{path}: cannot read stored CAMs ({e}); delete it and rerun "
                      "--mode=infer_cam") from None


class CrfStore(PerImage):
  """`crf/<id>.npz`: quantised CRF marginals, format in `affinity_jax.labels.store`."""
  folder = "crf"
  suffix = ".npz"

  def save(self, image_id: str, la: np.ndarray, ha: np.ndarray, keys: np.ndarray) -> None:
    crf_format.save(self.directory, image_id, la, ha, keys)

  def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (la float32 [H, W, L], ha float32 [H, W, L], keys int32 [L])."""
    return crf_format.load(self.directory, image_id)


class LabelStore(PerImage):
  """`<folder>/<id>.png`: uint8 [H, W] label ids as a VOC-paletted PNG."""
  suffix = ".png"

  def __init__(self, root: str, folder: str, process_index: int = 0):
    self.folder = folder
    super().__init__(root, process_index)

  def save(self, image_id: str, label: np.ndarray) -> None:
    io.save_label_png(self.path(image_id), label)

  def load(self, image_id: str) -> np.ndarray:
    return io.read_label_png(self.path(image_id))


class CheckpointStore:
  """`<kind>/`: the training stage's folder (`loop.train` writes ckpt/ and the log)."""

  def __init__(self, root: str, kind: str):
    if kind not in KINDS:
      raise ValueError(f"unknown network kind {kind!r}; one of {KINDS}")
    self.kind = kind
    self.directory = os.path.join(root, kind)
    self.checkpoints = os.path.join(self.directory, CHECKPOINT)
    self.metrics = os.path.join(self.directory, METRICS)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (None when there is none)."""
    if not os.path.isdir(self.checkpoints):
      return None
    from affinity_jax.training import checkpoint
    ckpt = checkpoint.Checkpointer(self.checkpoints)
    try:
      return ckpt.latest_step()
    finally:
      ckpt.close()

  def exists(self) -> bool:
    return self.latest_step() is not None

  def finished(self, steps: int) -> bool:
    """Whether training reached `steps`."""
    step = self.latest_step()
    return step is not None and step >= steps

  def load(self, model, steps: int, sharding=None):
    """Restores the newest checkpoint's variables (no optimiser state) into `model`.

    Args:
      model: the network as built, updated in place.
      steps: the stage's `train.steps`; an earlier checkpoint is refused.
      sharding: where the restored arrays go (default: the first device).

    Returns:
      `model`.

    Raises:
      UserError: the training stage has not finished (or never started).
    """
    step = self.latest_step()
    if step is None or step < steps:
      raise UserError(f"{self.checkpoints}: training stage train_{self.kind} has not "
                      f"finished (step {step or 0} of {steps}); run "
                      f"--mode=train_{self.kind} first")
    from affinity_jax.training import checkpoint
    checkpoint.restore_model(model, self.checkpoints, step, sharding)
    return model


class ReportStore:
  """`eval/`: what the eval stage writes (results.json is written last)."""
  folder = "eval"
  RESULTS = "results.json"
  TABLE = "results.md"

  def __init__(self, root: str, folder: str = folder):
    self.directory = os.path.join(root, folder)

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def exists(self) -> bool:
    return os.path.exists(self.path(self.RESULTS))

  finished = exists

  def markdown(self) -> str:
    """The results table as Markdown."""
    path = self.path(self.TABLE)
    if not os.path.exists(path):
      raise UserError(f"{path} does not exist; run the eval stage first")
    with open(path) as f:
      return f.read()


class Workdir:
  """One run's folder: a store per artefact (see the module docstring).

  Args:
    root: the workdir.
    process_index: this host's index (`jax.process_index()`), for the DONE markers.
  """

  def __init__(self, root: str, process_index: int = 0):
    self.root = root
    self.config = os.path.join(root, CONFIG)
    self.datasets = os.path.join(root, DATASETS)
    self.cams = CamStore(root, process_index)
    self.crf = CrfStore(root, process_index)
    self.rw = LabelStore(root, "rw", process_index)
    self.rw_crf = LabelStore(root, "rw_crf", process_index)
    self.reports = ReportStore(root)

  def checkpoints(self, kind: str) -> CheckpointStore:
    """The training folder of network `kind` ("cam", "aff" or "seg")."""
    return CheckpointStore(self.root, kind)

  def training_logs(self) -> dict[str, str]:
    """{network kind: its metrics.jsonl} for every trained network (some may not exist)."""
    return {kind: self.checkpoints(kind).metrics for kind in KINDS}

  def pseudo_labels(self, dcrf: bool) -> LabelStore:
    """The labels the segmentation net trains on: `rw_crf` with `rw.dcrf`, else `rw`."""
    return self.rw_crf if dcrf else self.rw


class InUse(UserError):
  """Another run holds the workdir's lock; `holder` is its record (host, pid, since)."""

  def __init__(self, root: str, holder: dict):
    who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
           f"{holder.get('since', '?')}") if holder else "holder unknown"
    self.where = f"workdir {root} is in use by another run ({who})"
    super().__init__(f"{self.where}; wait for it to end or use another --workdir")
    self.holder = holder


class Lock:
  """This process's hold on a workdir's `lock` file; `release` (or the process's end,
  even by SIGKILL) gives it up."""

  def __init__(self, path: str, fd: int):
    self.path = path
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor drops the kernel lock.
      self._fd = None

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock(root: str) -> Lock:
  """Takes the lock of workdir `root` (created if missing) for this process.

  A kernel lock (`flock`) on `<root>/lock`: the kernel drops it when the holder's
  process ends however it ends, so a killed run never blocks the next one; on NFS the
  kernel maps it to a lock the server keeps for every client. The file is never
  deleted (a run that opened it before the deletion would lock a file others no
  longer see); it holds the last holder's host, pid and start time, for `InUse`.

  Raises:
    InUse: another run holds it (one line naming the holder).
    UserError: the workdir cannot be written (`io.write_error`), or its filesystem has
      no file locks.
  """
  path = os.path.join(root, LOCK)
  try:
    os.makedirs(root, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    raise io.write_error(path, e) from None
  try:
    for attempt in range(_TRIES):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if attempt == _TRIES - 1:
          raise
        time.sleep(0.05)  # Perhaps a starting run's `refuse_if_in_use`, for a moment.
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise InUse(root, holder) from None
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise UserError(f"{path}: the filesystem of workdir {root} has no file locks "
                      f"({e.strerror}); use a local disk or NFS") from None
    raise
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  data = (json.dumps(record) + "\n").encode()
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
  except OSError as e:
    os.close(fd)
    raise io.write_error(path, e) from None
  return Lock(path, fd)


def refuse_if_in_use(root: str) -> None:
  """Raises `InUse` when another run holds workdir `root`'s lock; writes nothing.

  A quick look before the heavy imports, so that a second run is refused at once; the
  run takes the lock itself later (`lock`).
  """
  path = os.path.join(root, LOCK)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # No lock file (a new workdir) or none readable: `lock` will tell.
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    raise InUse(root, _read_holder(fd)) from None
  except OSError:
    return
  finally:
    os.close(fd)


def _read_holder(fd: int) -> dict:
  try:
    record = json.loads(os.pread(fd, 4096, 0) or b"{}")
  except (OSError, ValueError):  # Being written this very moment.
    return {}
  return record if isinstance(record, dict) else {}
