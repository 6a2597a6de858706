"""Preparing and opening the TFDS datasets, and decoding their examples.

`prepare` writes a dataset (array_record) under an explicit `data_dir`;
`open_split` reads one split back with `tfds` data sources (no TensorFlow)
and decodes it into the example dict of docs/design.md:

  image uint8 [H, W, 3], mask uint8 [H, W] (all 255 when the split has no mask),
  labels uint8 [20] multi-hot, id str, height int, width int.

The returned source is a grain `RandomAccessDataSource`, so decoding runs in
grain's worker processes.
"""

import io
import os
import threading
from typing import Any, Sequence

import numpy as np
from PIL import Image

from affinity_jax.errors import UserError

DATASETS = ("voc12", "scenes")


def make_builder(dataset: str, data_dir: str, **params: Any):
  """Returns the TFDS builder of `dataset` ('voc12' or 'scenes') under `data_dir`.

  Args:
    dataset: 'voc12' or 'scenes'.
    data_dir: where prepared datasets live (never defaults to ~/tensorflow_datasets).
    **params: for 'scenes', `ScenesConfig` fields (image_size, num_train, ...).
  """
  import tensorflow_datasets as tfds  # Heavy import, only where needed.

  if not data_dir:
    raise UserError("data_dir: an explicit data directory is required")
  if dataset == "voc12":
    from affinity_jax.data import voc
    if params:
      raise UserError(f"voc12 takes no parameters, got {sorted(params)}")
    return voc.Voc12(data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
  if dataset == "scenes":
    from affinity_jax.data import scenes
    config = scenes.ScenesConfig.make(**params)
    # TFDS wants the name, not an equal copy, for a config the class already lists.
    if any(c.name == config.name for c in scenes.Scenes.BUILDER_CONFIGS):
      config = config.name
    return scenes.Scenes(data_dir=data_dir, config=config,
                         file_format=tfds.core.FileFormat.ARRAY_RECORD)
  raise UserError(f"dataset: unknown dataset {dataset!r}, expected one of {DATASETS}")


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None,
            manual_flag: str = "--config.data.manual_dir", **params: Any):
  """Prepares `dataset` under `data_dir` (a no-op when already prepared); returns the builder.

  Args:
    dataset: 'voc12' or 'scenes'.
    data_dir: where prepared datasets live.
    manual_dir: voc12: the folder holding VOCdevkit/VOC2012 (or either of those).
    manual_flag: the flag that sets `manual_dir`, named in the errors about it.
    **params: for 'scenes', `ScenesConfig` fields.
  """
  import tensorflow_datasets as tfds

  builder = make_builder(dataset, data_dir, **params)
  if dataset == "voc12":
    from affinity_jax.data import voc
    if not manual_dir:
      raise UserError(f"manual_dir: voc12 needs the folder holding VOCdevkit/VOC2012; "
                      f"pass it with {manual_flag}=PATH")
    # Check the layout before TFDS starts (its own checks are multi-line asserts).
    manual_dir = voc.find_voc_root(manual_dir, manual_flag)
    voc.split_files(manual_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=config)
  return builder


# Decoded examples each process keeps (per split source), so that a training stage's
# later epochs skip reading and decoding: the embedded default's 400 scenes (20 MB)
# and voc_dev's 184 photos (~100 MB) fit. When the budget is full, further examples are
# decoded every time; nothing is evicted (a shuffled pass over a larger split would
# only churn).
CACHE_BYTES = 512 << 20


class DecodedSource:
  """A TFDS array_record split whose examples are decoded to NumPy (grain data source).

  Decoded examples are kept in memory up to `cache_bytes` per process, read-only: a
  transform must copy before it writes.
  """

  def __init__(self, dataset: str, split: str, data_dir: str, cache_bytes: int = CACHE_BYTES,
               **params: Any):
    self._args = (dataset, split, data_dir, params)
    self._source = None
    self._lock = threading.Lock()
    self._cache_bytes = cache_bytes
    self._cache, self._cache_left = {}, cache_bytes
    builder = make_builder(dataset, data_dir, **params)
    if not builder.is_prepared():
      raise UserError(f"{builder.data_dir}: dataset {dataset} is not prepared; run "
                      f"python -m affinity_jax.data.prepare --dataset={dataset} ...")
    if split not in builder.info.splits:
      raise UserError(f"split: {dataset} has no split {split!r} "
                      f"(has {sorted(builder.info.splits)})")
    self._length = builder.info.splits[split].num_examples
    self._builder_dir = os.fspath(builder.data_dir)
    for path in map(os.fspath, builder.info.splits[split].filepaths):
      if not os.path.isfile(path):
        raise UserError(f"{path}: missing from the prepared {dataset} dataset (half-prepared "
                        f"or damaged); delete {self._builder_dir} and prepare it again")

  def _open(self):
    # grain reads with several threads per worker. Under the lock only one of them
    # opens the files; importing tfds from several threads at once can deadlock
    # (module locks against the locks of tfds's lazy imports).
    with self._lock:
      if self._source is None:
        import tensorflow_datasets as tfds
        builder = tfds.builder_from_directory(self._builder_dir)
        self._source = builder.as_data_source(split=self._args[1])
    return self._source

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    example = self._cache.get(index)
    if example is None:
      example = decode_example(self._open()[index])
      size = sum(v.nbytes for v in example.values() if isinstance(v, np.ndarray))
      if size <= self._cache_left:
        for v in example.values():
          if isinstance(v, np.ndarray):
            v.flags.writeable = False
        self._cache[index], self._cache_left = example, self._cache_left - size
    return dict(example)

  def ids(self) -> list[str]:
    """Every example's id, in order, without decoding images."""
    source = self._open()
    return [_text(source[i]["id"]) for i in range(self._length)]

  def __getstate__(self):
    # Worker processes reopen the files themselves.
    state = dict(self.__dict__)
    state["_source"] = None
    state["_cache"], state["_cache_left"] = {}, self._cache_bytes
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    # Unpickled in a worker's main thread before its reader threads start.
    import tensorflow_datasets  # noqa: F401

  def __repr__(self) -> str:
    return f"DecodedSource({self._args[0]}, {self._args[1]}, n={self._length})"


class ById:
  """The examples of several splits by image id; the first split holding an id wins."""

  def __init__(self, splits: Sequence[DecodedSource]):
    self._splits = tuple(splits)
    self._index = None  # image id -> (split, record index), built on first use.

  def _lookup(self) -> dict[str, tuple[DecodedSource, int]]:
    if self._index is None:
      self._index = {}
      for split in self._splits:
        for i, image_id in enumerate(split.ids()):
          self._index.setdefault(image_id, (split, i))
    return self._index

  def ids(self) -> list[str]:
    """Every id once, in split order."""
    return list(self._lookup())

  def __getitem__(self, image_id: str) -> dict:
    """The decoded example `image_id` (docs/design.md)."""
    split, i = self._lookup()[image_id]
    return split[i]


def open_split(dataset: str, split: str, data_dir: str, **params: Any) -> DecodedSource:
  """Opens a prepared split as a random-access source of decoded example dicts."""
  return DecodedSource(dataset, split, data_dir, **params)


def decode_example(raw: dict) -> dict:
  """Decodes a stored example (encoded bytes) into the example dict of docs/design.md."""
  image = np.asarray(Image.open(io.BytesIO(raw["image"])).convert("RGB"), np.uint8)
  h, w = image.shape[:2]
  if raw["mask"]:
    mask = np.asarray(Image.open(io.BytesIO(raw["mask"])), np.uint8)
  else:
    mask = np.full((h, w), 255, np.uint8)
  image_id = _text(raw["id"])
  return {"image": image, "mask": mask, "labels": np.asarray(raw["labels"], np.uint8),
          "id": image_id, "height": int(raw["height"]), "width": int(raw["width"])}


def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value
