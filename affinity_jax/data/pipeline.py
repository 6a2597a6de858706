"""The input pipelines of every stage: grain loaders and global sharded batches.

Training pipelines (classification, affinity, segmentation) read a random-access
source of example dicts (`sources.open_split`), apply a per-example random
augmentation (a grain `RandomMapTransform`, NumPy only, run in `worker_count`
worker processes) and batch. Each process reads its own slice of every global batch
of the single-process stream (`BatchShareSampler`, by `jax.process_index` /
`jax.process_count`), and the local batches are assembled into global `jax.Array`s
sharded on the mesh's `data` axis: the global batches do not depend on the number of
processes.

The stream is a pure function of the seed and the worker count: grain draws
the shuffle order and a per-record random generator from the seed, and each
worker builds whole batches from every `worker_count`-th record.
`GlobalBatches.get_state()` returns a JSON-serialisable dict of the position;
`set_state` on a fresh iterator with the same arguments resumes the stream
exactly; the state records the worker count, and `set_state` continues with that
count whatever the iterator was built with, so a stage started on one host resumes
on another with the same stream. With worker_count > 0, grain starts worker
processes with `spawn`, so the main script needs the usual
`if __name__ == "__main__":` guard.

`worker_count=AUTO_WORKERS` (-1, `data.num_workers`'s default) asks for
`default_worker_count()`: one worker per core this process may run on, less one for
the main process, at most `MAX_AUTO_WORKERS`. It is resolved when the iterator is
built, on the host that runs it, never stored.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterator

import grain.python as grain
import jax
import numpy as np
from jax.sharding import Mesh

from affinity_jax import constants
from affinity_jax import sharding
from affinity_jax.data import transforms
from affinity_jax.errors import UserError

CrfLoader = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]
MaskLoader = Callable[[str], np.ndarray]


# ----------------------------------------------------------------------------- augmentations


def _check_size(example: dict, array: np.ndarray, what: str) -> None:
  if array.shape[:2] != example["image"].shape[:2]:
    raise UserError(f"{what} of {example['id']}: size {array.shape[:2]} differs from the "
                    f"image's {example['image'].shape[:2]}")


@dataclasses.dataclass
class ClassificationAugment(grain.RandomMapTransform):
  """Random long-side resize (bicubic), flip, colour jitter, normalise, crop with zero fill.

  Output: {image f32 [S,S,3], labels f32 [20]}.
  """
  crop_size: int = 448
  long_side: tuple[int, int] | None = None   # None: (256, 512) scaled by crop_size / 448.
  normalization: str = "imagenet_rgb"
  jitter: bool = True

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    image = _resize_flip_jitter(example["image"], None, rng, self.crop_size, self.long_side,
                                self.jitter)[0]
    x = transforms.normalize(image, self.normalization)
    box = transforms.random_crop_box(*x.shape[:2], self.crop_size, rng)
    return {"image": transforms.apply_crop(x, box, self.crop_size, 0.0),
            "labels": example["labels"].astype(np.float32)}


@dataclasses.dataclass
class SegmentationAugment(grain.RandomMapTransform):
  """Classification's augmentations applied jointly to the image and a pseudo mask.

  The mask comes from `mask_loader(id) -> uint8 [H,W]` (None: the example's own
  mask), is resized with nearest neighbours and padded with 255.
  Output: {image f32 [S,S,3], mask uint8 [S,S]}.
  """
  mask_loader: MaskLoader | None = None
  crop_size: int = 448
  long_side: tuple[int, int] | None = None
  normalization: str = "imagenet_rgb"
  jitter: bool = True

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if self.mask_loader is None:
      mask = example["mask"]
    else:
      mask = np.asarray(self.mask_loader(example["id"]), np.uint8)
      _check_size(example, mask, "pseudo mask")
    image, mask = _resize_flip_jitter(example["image"], mask, rng, self.crop_size,
                                      self.long_side, self.jitter)
    x = transforms.normalize(image, self.normalization)
    box = transforms.random_crop_box(*x.shape[:2], self.crop_size, rng)
    return {"image": transforms.apply_crop(x, box, self.crop_size, 0.0),
            "mask": transforms.apply_crop(mask, box, self.crop_size, constants.IGNORE)}


@dataclasses.dataclass
class AffinityAugment(grain.RandomMapTransform):
  """Joint flip and crop of the image and its CRF marginals, then the 1/8 label map.

  No rescaling (the spec). `crf_loader(id) -> (la [H,W,L] f32, ha [H,W,L] f32,
  keys [L] int)`. Output: {image f32 [S,S,3], label_map uint8 [S/8,S/8]}.
  """
  crf_loader: CrfLoader = None
  crop_size: int = 448
  normalization: str = "imagenet_rgb"
  jitter: bool = True
  stride: int = 8

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if self.crop_size % self.stride:
      raise UserError(f"crop_size: {self.crop_size} is not a multiple of {self.stride}")
    la, ha, keys = self.crf_loader(example["id"])
    _check_size(example, la, "CRF la")
    _check_size(example, ha, "CRF ha")
    image = example["image"]
    if rng.uniform() < 0.5:
      image, la, ha = image[:, ::-1], la[:, ::-1], ha[:, ::-1]
    if self.jitter:
      image = transforms.colour_jitter(np.ascontiguousarray(image), rng)
    x = transforms.normalize(image, self.normalization)
    box = transforms.random_crop_box(*x.shape[:2], self.crop_size, rng)
    s = self.crop_size
    la_c = transforms.apply_crop(np.asarray(la, np.float32), box, s, 0.0)
    ha_c = transforms.apply_crop(np.asarray(ha, np.float32), box, s, 0.0)
    return {"image": transforms.apply_crop(x, box, s, 0.0),
            "label_map": transforms.label_map_from_crf(la_c, ha_c, keys, self.stride)}


def _resize_flip_jitter(image, mask, rng, crop_size, long_side, jitter):
  """Shared first half of the classification / segmentation augmentation (uint8 in and out)."""
  lo, hi = long_side or transforms.scaled_long_side_range(crop_size)
  size = transforms.long_side_size(*image.shape[:2], int(rng.integers(lo, hi + 1)))
  image = transforms.resize(image, size, "bicubic")
  if mask is not None:
    mask = transforms.resize(mask, size, "nearest")
  if rng.uniform() < 0.5:
    image = image[:, ::-1]
    mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
  image = np.ascontiguousarray(image)
  if jitter:
    image = transforms.colour_jitter(image, rng)
  return image, mask


# ----------------------------------------------------------------------------- global batches

AUTO_WORKERS = -1
# One worker decodes and augments 24 (train_aff) to 66 (train_cam) VOC images/s at 448 px
# on a core of the development CPU (`benchmarks.inputs`, docs/benchmarks.md): 16 feed a
# step of ~390 images/s or more. More processes only cost memory (each holds its own
# copy of the source and grain's buffers).
MAX_AUTO_WORKERS = 16


def available_cpus() -> int:
  """Cores this process may run on (its affinity mask; `os.cpu_count()` without one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def default_worker_count(cpus: int | None = None) -> int:
  """Grain worker processes for a host with `cpus` cores (default: `available_cpus()`).

  One per core, less one for the main process (it assembles batches and drives the
  train step), at most `MAX_AUTO_WORKERS`; 0 (augment in the main process) on one core.
  """
  cpus = available_cpus() if cpus is None else cpus
  return max(0, min(cpus - 1, MAX_AUTO_WORKERS))


def resolve_worker_count(worker_count: int) -> int:
  """`worker_count`, with `AUTO_WORKERS` replaced by `default_worker_count()`."""
  if worker_count == AUTO_WORKERS:
    return default_worker_count()
  if worker_count < 0:
    raise UserError(f"num_workers: {worker_count}; expected >= 0, or {AUTO_WORKERS} for "
                    "one per core less one")
  return worker_count


class GlobalBatches:
  """An endless (or `num_epochs`-long) iterator of global batches sharded on `data`.

  Args:
    source: random-access source of example dicts (len + getitem; picklable
      when worker_count > 0, as are the transform and its loaders).
    transform: the per-example grain transform (e.g. `ClassificationAugment`).
    mesh: the device mesh; batches are sharded over its 'data' axis.
    batch_size: global batch size (divisible by the process count and by the
      'data' axis size).
    seed: shuffle order and augmentation randomness.
    worker_count: grain worker processes (0 = in this process; `AUTO_WORKERS` =
      `default_worker_count()`). A resumed stream keeps the count it was saved with.
    num_epochs: None repeats forever (one continuous shuffled stream: a batch
      may hold the end of one epoch and the start of the next).
    shuffle: shuffle the records each epoch.
    drop_remainder: drop the last incomplete batch of the stream.
    process_index, process_count: default to jax's.
  """

  def __init__(self, source, transform, *, mesh: Mesh, batch_size: int, seed: int,
               worker_count: int = 0, num_epochs: int | None = None, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int | None = None,
               process_count: int | None = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    data_size = mesh.shape[sharding.DATA_AXIS]
    if batch_size % self.process_count or batch_size % data_size:
      raise UserError(f"batch_size: {batch_size} is not divisible by the process count "
                      f"{self.process_count} and the {sharding.DATA_AXIS!r} axis size {data_size}")
    if len(source) < batch_size:
      raise UserError(f"batch_size: {batch_size} exceeds the {len(source)} examples of {source}")
    self.mesh = mesh
    self.batch_size = batch_size
    self.local_batch_size = batch_size // self.process_count
    self.sharding = sharding.data_sharding(mesh)
    self._loader_args = (source, transform, batch_size, num_epochs, shuffle, seed,
                         drop_remainder)
    self.steps_per_epoch = len(source) // batch_size
    self._start(resolve_worker_count(worker_count))

  def _start(self, worker_count: int) -> None:
    """(Re)builds the grain loader with `worker_count` processes, at the stream's start."""
    source, transform, batch_size, num_epochs, shuffle, seed, drop_remainder = (
        self._loader_args)
    # The sampler depends on the worker count: it deals whole batches out to workers.
    sampler = BatchShareSampler(
        grain.IndexSampler(num_records=len(source), num_epochs=num_epochs,
                           shuffle=shuffle, seed=seed, shard_options=grain.NoSharding()),
        batch_size, self.process_index, self.process_count, worker_count)
    if worker_count > 0:
      _absl_flags_parsed()
    self.worker_count = worker_count
    # Records are read inline: grain's defaults (16 reader threads, 500 records ahead)
    # suit remote disks; on local array_record files their threads and buffer polling
    # took cores from the train step (embedded train_aff: 4.75 -> 5.98 steps/s on
    # 2 cores, the same batches).
    self._loader = grain.DataLoader(
        data_source=source, sampler=sampler, worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
        operations=[transform, grain.Batch(self.local_batch_size, drop_remainder=drop_remainder)])
    self._it = iter(self._loader)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def next_local(self) -> dict[str, np.ndarray]:
    """This process's part of the next global batch, as NumPy."""
    return next(self._it)

  def __next__(self) -> dict[str, jax.Array]:
    return self.to_global(self.next_local())

  def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles per-process batches into global arrays sharded on 'data'."""
    return {k: jax.make_array_from_process_local_data(
        self.sharding, v, (self.batch_size,) + v.shape[1:]) for k, v in local.items()}

  def get_state(self) -> dict[str, Any]:
    """The stream position, JSON-serialisable (save it with the checkpoint)."""
    return json.loads(self._it.get_state().decode("utf-8"))

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position from `get_state` (same source, transform and arguments).

    The stream depends on the worker count, so the loader is rebuilt with the count
    saved in `state` when it differs from this iterator's (e.g. `AUTO_WORKERS` on a
    host with other cores): the resumed stream is the one that was saved.
    """
    saved = state.get("worker_count", self.worker_count)
    if saved != self.worker_count:
      self._start(saved)
    self._it.set_state(json.dumps(state).encode("utf-8"))


class BatchShareSampler:
  """This process's share of every global batch of one single-process record stream.

  `base` orders the records (and draws each one's random generator) as for a single
  process. Process p of n reads the slice [p*b, (p+1)*b) (b = batch_size / n) of every
  global batch of that stream, taking into account how grain's `worker_count` workers
  deal out the records of whole batches. So the global batch, its augmentations
  included, does not depend on how many processes read it: 2 hosts x 4 devices train
  on the same batches as 1 x 8. The shares are disjoint and the local position (what
  `get_state` saves) advances alike on every process.

  Args:
    base: a grain `IndexSampler` without sharding.
    batch_size: the global batch size (a multiple of `process_count`).
    process_index, process_count: this process and how many read the stream.
    worker_count: grain's worker processes (0: in this process).
  """

  def __init__(self, base, batch_size: int, process_index: int, process_count: int,
               worker_count: int = 0):
    self._base = base
    self._shard_options = grain.NoSharding()  # The DataLoader takes it from here.
    self.local_batch_size = batch_size // process_count
    self.batch_size, self.process_index = batch_size, process_index
    self.workers = max(worker_count, 1)

  def global_index(self, index: int) -> int:
    """The single-process stream position of this process's local position `index`."""
    # Worker w (of W) batches the local positions w, w + W, ...; the same in the
    # single-process stream, with the global batch size.
    w, m = index % self.workers, index // self.workers
    batch, j = divmod(m, self.local_batch_size)
    return w + self.workers * (batch * self.batch_size
                               + self.process_index * self.local_batch_size + j)

  def __len__(self) -> int:
    n = len(self._base)
    if n == sys.maxsize:  # Endless.
      return n
    # Whole rounds of one global batch per worker, so every process stops together.
    return n // (self.workers * self.batch_size) * self.workers * self.local_batch_size

  def __getitem__(self, index: int):
    return self._base[self.global_index(index)]

  def __repr__(self) -> str:
    return (f"BatchShareSampler({self._base!r}, batch_size={self.batch_size}, "
            f"process_index={self.process_index}, "
            f"process_count={self.batch_size // self.local_batch_size})")


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; programs without absl never parse them."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def classification_batches(source, *, mesh: Mesh, batch_size: int, seed: int,
                           crop_size: int = 448, long_side: tuple[int, int] | None = None,
                           normalization: str = "imagenet_rgb", jitter: bool = True,
                           **kw) -> GlobalBatches:
  """Batches {image f32 [B,S,S,3], labels f32 [B,20]}; `kw` go to `GlobalBatches`."""
  t = ClassificationAugment(crop_size, long_side, normalization, jitter)
  return GlobalBatches(source, t, mesh=mesh, batch_size=batch_size, seed=seed, **kw)


def affinity_batches(source, crf_loader: CrfLoader, *, mesh: Mesh, batch_size: int,
                     seed: int, crop_size: int = 448, normalization: str = "imagenet_rgb",
                     jitter: bool = True, **kw) -> GlobalBatches:
  """Batches {image f32 [B,S,S,3], label_map uint8 [B,S/8,S/8]}."""
  t = AffinityAugment(crf_loader, crop_size, normalization, jitter)
  return GlobalBatches(source, t, mesh=mesh, batch_size=batch_size, seed=seed, **kw)


def segmentation_batches(source, mask_loader: MaskLoader | None, *, mesh: Mesh,
                         batch_size: int, seed: int, crop_size: int = 448,
                         long_side: tuple[int, int] | None = None,
                         normalization: str = "imagenet_rgb", jitter: bool = True,
                         **kw) -> GlobalBatches:
  """Batches {image f32 [B,S,S,3], mask uint8 [B,S,S]} (mask padded with 255)."""
  t = SegmentationAugment(mask_loader, crop_size, long_side, normalization, jitter)
  return GlobalBatches(source, t, mesh=mesh, batch_size=batch_size, seed=seed, **kw)
