"""The workdir's layout: every folder name lives here, each artefact behind one store.

  workdir/
    lock                        who runs in it (`lock`): host, pid, since when
    config.json                 the resolved config (`claim`)
    tfds/                       prepared datasets (unless data.data_dir is set; for a
                                workdir in a bucket, a local cache: `Workdir.datasets`)
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

The root may be a local folder or a bucket URL (`gs://bucket/run`): every file goes
through `affinity_jax.io`, the one path layer.

Imports only NumPy at the top (orbax when a checkpoint is read), so the input
pipeline's worker processes, which unpickle the stores' `load`, stay light.
"""

import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time

import numpy as np

from affinity_jax import config_lib
from affinity_jax import io
from affinity_jax.errors import UserError
from affinity_jax.labels import store as crf_format

CONFIG = "config.json"
LOCK = "lock"
_TRIES = 5  # `lock` tries this often, 50 ms apart, before it refuses.
# A lock in a bucket is a lease: its holder renews it every LEASE_S / 4 seconds, and
# one not renewed for LEASE_S seconds (its holder was killed) may be taken over.
LEASE_ENV = "AFFINITY_JAX_LOCK_LEASE_S"
LEASE_S = 60.0
DATASETS = "tfds"
DATASETS_CACHE_ENV = "AFFINITY_JAX_DATASETS_CACHE"
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
    return io.exists(self.path(image_id))

  def finished(self) -> bool:
    """Whether this process wrote all its files (see `mark_finished`)."""
    return io.exists(self._marker)

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
      with io.open_file(path) as raw, np.load(raw) as f:
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
    if not io.isdir(self.checkpoints):
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
  SEG_PREFIX = "seg ("

  @classmethod
  def seg_method(cls, split: str) -> str:
    """The segmentation net's name in the reports, scored on `split`: "seg (val)"."""
    return f"{cls.SEG_PREFIX}{split})"

  def __init__(self, root: str, folder: str = folder):
    self.directory = os.path.join(root, folder)

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def exists(self) -> bool:
    return io.exists(self.path(self.RESULTS))

  finished = exists

  def methods(self) -> list[str]:
    """The methods results.json scores (empty when it does not exist)."""
    if not self.exists():
      return []
    return list(json.loads(io.read_text(self.path(self.RESULTS)))["methods"])

  def markdown(self) -> str:
    """The results table as Markdown."""
    path = self.path(self.TABLE)
    if not io.exists(path):
      raise UserError(f"{path} does not exist; run the eval stage first")
    return io.read_text(path)


class Workdir:
  """One run's folder: a store per artefact (see the module docstring).

  Args:
    root: the workdir.
    process_index: this host's index (`jax.process_index()`), for the DONE markers.
  """

  def __init__(self, root: str, process_index: int = 0):
    self.root = root
    self.config = os.path.join(root, CONFIG)
    # Whether every host prepares its own copy of the datasets (see `_datasets_cache`).
    self.datasets_per_host = io.is_remote(root)
    self.datasets = (_datasets_cache(root, process_index) if self.datasets_per_host
                     else os.path.join(root, DATASETS))
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


def _datasets_cache(root: str, process_index: int) -> str:
  """Where a workdir in a bucket keeps its prepared datasets: a local folder per host.

  ArrayRecord files are read from local disks only; a prepared dataset is a cache of
  `data.manual_dir` (or of the generated scenes), which every host can rebuild.
  `$AFFINITY_JAX_DATASETS_CACHE` (default `~/.cache/affinity_jax/datasets`) holds one
  folder per workdir and process.
  """
  base = os.environ.get(DATASETS_CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "affinity_jax", "datasets")
  name = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(base, f"{name}-{process_index}")


def claim(config, root: str, config_name: str, write: bool = True) -> None:
  """Claims workdir `root` for `config` or checks that it already belongs to it.

  Writes `<root>/config.json` (`config_lib.to_record`) on the first run and again when
  only keys free to change changed (so it always shows the latest run's values); with
  `write=False` only checks (the hosts of a multi-host run but the first). The
  segmentation net's keys (`config_lib.SEG_KEYS`) are free until that net has started:
  trained or scored there.

  Raises:
    UserError: the workdir was written by a config that differs in another key.
  """
  path = os.path.join(root, CONFIG)
  record = config_lib.to_record(config, config_name)
  if io.exists(path):
    saved = _read_record(path)
    difference = config_lib.first_difference(saved, record)
    # Only when something differs: reading the workdir's state costs requests in a bucket.
    if difference and not _seg_started(root):
      difference = config_lib.first_difference(saved, record, config_lib.SEG_KEYS)
    if difference:
      key, old, new = difference
      raise UserError(f"workdir {root} was written by config {saved['config_name']} "
                      f"({key}: {old!r} there, {new!r} now); use another --workdir")
    if saved == record:
      return
  if write:
    io.write_json(path, record)


def _seg_started(root: str) -> bool:
  """Whether the segmentation net has trained (its folder exists) or been scored in
  `root`."""
  return (io.exists(CheckpointStore(root, "seg").directory)
          or any(m.startswith(ReportStore.SEG_PREFIX) for m in ReportStore(root).methods()))


def saved_config(root: str):
  """The config that wrote workdir `root`: (its name, the locked config)
  (`config_lib.from_record`)."""
  return config_lib.from_record(_read_record(os.path.join(root, CONFIG)))


def _read_record(path: str) -> dict:
  try:
    record = json.loads(io.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a config written by affinity_jax ({e}); use another "
                    "--workdir") from None
  return config_lib.check_record(record, path)


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

  In a bucket (`gs://`), which has no file locks, a lease (`Lease`).

  Raises:
    InUse: another run holds it (one line naming the holder).
    UserError: the workdir cannot be written (`io.write_error`), or its filesystem has
      no file locks.
  """
  if io.is_remote(root):
    return Lease.take(root)
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
  data = _holder_record()
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
  if io.is_remote(root):
    Lease.refuse_if_held(root)
    return
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


def _holder_record() -> bytes:
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  return (json.dumps(record) + "\n").encode()


def _lease_s() -> float:
  try:
    return float(os.environ.get(LEASE_ENV) or LEASE_S)
  except ValueError:
    raise UserError(f"${LEASE_ENV}={os.environ[LEASE_ENV]!r} is not a number of "
                    "seconds") from None


class Lease:
  """The lock of a workdir in a bucket: the object `<root>/lock`, held while renewed.

  Taking it creates the object only if none exists (a generation precondition, so of
  two runs starting together one wins); a thread renews it every lease / 4 seconds,
  again only if it is still this run's version. An object not renewed for the lease
  (`$AFFINITY_JAX_LOCK_LEASE_S`, default 60 s: its holder was killed) is stale and
  taken over, again under a precondition. Its age is the bucket's clock against this
  host's, so hosts need clocks within a few seconds of true time (NTP, as cloud VMs
  have). `release` deletes it.
  """

  def __init__(self, blob, generation: int, lease_s: float):
    self.path = f"gs://{blob.bucket.name}/{blob.name}"
    self._blob, self._generation, self._lease_s = blob, generation, lease_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name="affinity_jax-lease")
    self._thread.start()

  @staticmethod
  def _blob(root: str):
    if not root.startswith("gs://"):
      raise UserError(f"workdir {root}: only local folders and gs:// buckets have a "
                      "workdir lock")
    from google.cloud import storage  # Only for workdirs in a bucket.

    bucket, _, prefix = root[len("gs://"):].partition("/")
    name = "/".join(p for p in (prefix.strip("/"), LOCK) if p)
    return storage.Client().bucket(bucket).blob(name)

  @classmethod
  def _current(cls, root: str):
    """(blob, its generation, its holder record, its age in s); generation None if
    there is no lock object."""
    blob = cls._blob(root)
    from google.api_core import exceptions

    current = blob.bucket.get_blob(blob.name)  # Its generation and update time.
    if current is None:
      return blob, None, {}, 0.0
    try:
      data = current.download_as_bytes(if_generation_match=current.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):  # Released or renewed
      data = b""  # just now: held (a new version is not stale).
    try:
      holder = json.loads(data or b"{}")
    except ValueError:
      holder = {}
    age = (datetime.datetime.now(datetime.timezone.utc) - current.updated).total_seconds()
    return blob, current.generation, holder if isinstance(holder, dict) else {}, age

  @classmethod
  def refuse_if_held(cls, root: str) -> None:
    """Raises `InUse` when a live lease holds `root`; writes nothing."""
    try:
      _, generation, holder, age = cls._current(root)
    except UserError:
      raise
    except Exception:  # noqa: BLE001 -- `take` will say what is wrong with the bucket.
      return
    if generation is not None and age < _lease_s():
      raise InUse(root, holder)

  @classmethod
  def take(cls, root: str) -> "Lease":
    from google.api_core import exceptions

    lease_s = _lease_s()
    try:
      blob, generation, holder, age = cls._current(root)
      if generation is not None and age < lease_s:
        raise InUse(root, holder)
      # Create it only if absent, or replace only the stale version just read.
      blob.upload_from_string(_holder_record(), content_type="application/json",
                              if_generation_match=generation or 0)
    except exceptions.PreconditionFailed:  # Another run took it between read and write.
      _, _, holder, _ = cls._current(root)
      raise InUse(root, holder) from None
    except exceptions.GoogleAPIError as e:
      raise UserError(f"cannot take the lock {root}/{LOCK}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return cls(blob, blob.generation, lease_s)

  def _renew(self) -> None:
    from google.api_core import exceptions

    while not self._stop.wait(self._lease_s / 4):
      try:
        self._blob.upload_from_string(_holder_record(), content_type="application/json",
                                      if_generation_match=self._generation)
        self._generation = self._blob.generation
      except exceptions.PreconditionFailed:
        print(f"warning: lost the workdir lock {self.path} (not renewed for "
              f"{self._lease_s:.0f} s, another run took it)", flush=True)
        return
      except Exception as e:  # noqa: BLE001 -- a network error: try again next time.
        print(f"warning: could not renew the workdir lock {self.path}: {e}", flush=True)

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()
    from google.api_core import exceptions

    try:
      self._blob.delete(if_generation_match=self._generation)
    except exceptions.GoogleAPIError:  # Lost or gone already: nothing of ours to delete.
      pass

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()
