"""Input pipelines: joint alignment, border padding, label maps, sharded global batches, resume."""

import dataclasses
import json

import grain.python as grain
import jax
import numpy as np
import pytest

from affinity_jax.data import pipeline, transforms
from affinity_jax.errors import UserError

BG = np.array([20, 40, 200], np.uint8)
FG = np.array([230, 200, 30], np.uint8)


def _pattern_example(h=60, w=80, image_id="p0"):
  """An image with an off-centre rectangle (class 7) whose position we know."""
  image = np.broadcast_to(BG, (h, w, 3)).copy()
  mask = np.zeros((h, w), np.uint8)
  image[10:30, 5:35] = FG
  mask[10:30, 5:35] = 7
  labels = np.zeros(20, np.uint8)
  labels[6] = 1
  return {"image": image, "mask": mask, "labels": labels, "id": image_id,
          "height": h, "width": w}


def _denorm(x):
  return (x * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255


def _erode(m, k=2):
  """Pixels whose whole (2k+1)^2 square neighbourhood is in `m` (outside counts as in)."""
  p = np.pad(m, k, constant_values=True)
  out = np.ones_like(m)
  for dy in range(2 * k + 1):
    for dx in range(2 * k + 1):
      out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
  return out


@pytest.mark.parametrize("seed", range(6))
def test_segmentation_augment_keeps_image_and_mask_aligned(seed):
  ex = _pattern_example()
  aug = pipeline.SegmentationAugment(None, crop_size=64, long_side=(40, 120), jitter=False)
  out = aug.random_map(ex, np.random.default_rng(seed))
  img, mask = _denorm(out["image"]), out["mask"]
  assert out["image"].shape == (64, 64, 3) and mask.shape == (64, 64)
  assert set(np.unique(mask)) <= {0, 7, 255}
  fg, bg, pad = _erode(mask == 7), _erode(mask == 0), mask == 255
  assert np.abs(img[fg] - FG).max() < 12
  assert np.abs(img[bg] - BG).max() < 12
  # Crop padding: mask 255 exactly where the image is zero after normalisation.
  np.testing.assert_array_equal(pad, (out["image"] == 0).all(-1))


def test_segmentation_augment_with_mask_loader_and_size_check():
  ex = _pattern_example()
  pseudo = np.where(ex["mask"] == 7, 3, 0).astype(np.uint8)
  aug = pipeline.SegmentationAugment(lambda i: pseudo, crop_size=32, jitter=False)
  out = aug.random_map(ex, np.random.default_rng(0))
  assert set(np.unique(out["mask"])) <= {0, 3, 255}
  bad = pipeline.SegmentationAugment(lambda i: pseudo[:10], crop_size=32)
  with pytest.raises(UserError, match="p0"):
    bad.random_map(ex, np.random.default_rng(0))


def test_classification_augment_border_crop_pads_with_zeros():
  ex = _pattern_example()
  aug = pipeline.ClassificationAugment(crop_size=96, long_side=(40, 50),
                                       normalization="caffe_bgr")
  out = aug.random_map(ex, np.random.default_rng(0))
  x = out["image"]
  assert x.shape == (96, 96, 3) and x.dtype == np.float32
  filled = ~(x == 0).all(-1)
  rows, cols = np.nonzero(filled)
  # The resized image (long side 40..50) is a rectangle in the zero-filled crop.
  h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
  assert 40 <= max(h, w) <= 50 and filled.sum() == h * w
  np.testing.assert_array_equal(out["labels"], ex["labels"].astype(np.float32))


def test_affinity_augment_label_map_matches_direct_computation():
  ex = _pattern_example(h=56, w=72)
  h, w = 56, 72
  keys = np.array([0, 7])
  fg = (ex["mask"] == 7).astype(np.float32)
  la = np.stack([0.3 + 0.4 * (1 - fg), 0.7 * fg], -1)     # bg wins outside the rectangle
  ha = np.stack([0.9 * (1 - fg) + 0.2 * fg, 0.1 + 0.5 * fg], -1)
  aug = pipeline.AffinityAugment(lambda i: (la, ha, keys), crop_size=64, jitter=False)
  for seed in range(4):
    out = aug.random_map(ex, np.random.default_rng(seed))
    # Redo the random draws in the same order, then compute directly.
    rng = np.random.default_rng(seed)
    flip = rng.uniform() < 0.5
    box = transforms.random_crop_box(h, w, 64, rng)
    f = (lambda a: a[:, ::-1]) if flip else (lambda a: a)
    la_c = transforms.apply_crop(f(la), box, 64, 0.0)
    ha_c = transforms.apply_crop(f(ha), box, 64, 0.0)
    want = np.zeros((8, 8), np.uint8)
    for i in range(8):
      for j in range(8):
        bl = la_c[8 * i:8 * i + 8, 8 * j:8 * j + 8].mean((0, 1))
        bh = ha_c[8 * i:8 * i + 8, 8 * j:8 * j + 8].mean((0, 1))
        want[i, j] = (255 if bl.max() <= 1e-5 else 0 if np.argmax(bh) == 0
                      else 255 if np.argmax(bl) == 0 else keys[np.argmax(bl)])
    np.testing.assert_array_equal(out["label_map"], want)
    # The label map is aligned with the image: class-7 cells sit on the yellow rectangle.
    img = _denorm(out["image"])
    cells = np.argwhere(out["label_map"] == 7)
    assert len(cells)
    for i, j in cells:
      centre = img[8 * i + 4, 8 * j + 4]
      assert np.abs(centre - FG).max() < 12


# ----------------------------------------------------------------------------- batches


class IndexSource:
  """Example i has an image filled with i (a picklable in-memory source)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": int(i)}

  def __repr__(self):
    return f"IndexSource({self.n})"


@dataclasses.dataclass
class Stamp(grain.RandomMapTransform):
  """Image = the record index everywhere, plus a random number from the record's generator."""

  def random_map(self, ex, rng):
    return {"image": np.full((4, 4, 3), ex["index"], np.float32),
            "noise": np.float32(rng.uniform()).reshape(1)}


def _mesh():
  return jax.make_mesh((8,), ("data",))


def test_sharded_batch_holds_the_global_batch():
  assert jax.device_count() == 8
  batches = pipeline.GlobalBatches(IndexSource(50), Stamp(), mesh=_mesh(), batch_size=16, seed=0)
  seen = []
  for _ in range(3):
    b = next(batches)
    img = b["image"]
    assert img.shape == (16, 4, 4, 3)
    assert len(img.addressable_shards) == 8
    full = np.asarray(img)
    for shard in img.addressable_shards:
      assert shard.data.shape == (2, 4, 4, 3)
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    seen.extend(full[:, 0, 0, 0].astype(int).tolist())
  # Shuffled, no repeats within an epoch, and all from the source.
  assert len(set(seen)) == 48 and seen != sorted(seen) and max(seen) < 50
  assert batches.steps_per_epoch == 3


def test_process_split_is_disjoint():
  mesh = _mesh()
  parts = []
  for pid in range(2):
    b = pipeline.GlobalBatches(IndexSource(40), Stamp(), mesh=mesh, batch_size=16, seed=1,
                               num_epochs=1, process_index=pid, process_count=2)
    assert b.local_batch_size == 8
    idx = []
    for _ in range(b.steps_per_epoch):
      idx.extend(b.next_local()["image"][:, 0, 0, 0].astype(int).tolist())
    parts.append(set(idx))
  assert not parts[0] & parts[1]
  assert len(parts[0]) == len(parts[1]) == 16


def _ids_and_noise(local):
  return list(zip(local["image"][:, 0, 0, 0].astype(int).tolist(),
                  local["noise"][:, 0].tolist()))


def test_process_shares_make_the_single_process_batch():
  """2 processes read disjoint halves of every batch of the 1-process stream, the
  records' random draws included, across epochs; each resumes from its own state."""
  def make(pid, count):
    return pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=8,
                                  seed=5, process_index=pid, process_count=count)
  one, shares = make(0, 1), [make(0, 2), make(1, 2)]
  for _ in range(6):  # 48 records of a 20-record source: three epochs.
    whole = _ids_and_noise(one.next_local())
    parts = [_ids_and_noise(s.next_local()) for s in shares]
    assert parts[0] + parts[1] == whole
    assert not {i for i, _ in parts[0]} & {i for i, _ in parts[1]}
  states = [json.loads(json.dumps(s.get_state())) for s in shares]
  want = [_ids_and_noise(s.next_local()) for s in shares]
  for pid, state in enumerate(states):
    again = make(pid, 2)
    again.set_state(state)
    assert _ids_and_noise(again.next_local()) == want[pid]


@pytest.mark.parametrize("workers", [2, 3])
def test_process_shares_with_worker_processes(workers):
  """With grain's workers (worker w batches the local positions w, w + W, ...) the
  shares still put together the single-process batches."""
  def batches(sampler, local_batch, count):
    per_worker = [[sampler.global_index(i) for i in range(w, 400, workers)]
                  for w in range(workers)]
    return [per_worker[k % workers][k // workers * local_batch:][:local_batch]
            for k in range(count)]
  base = grain.IndexSampler(num_records=10**6, shard_options=grain.NoSharding(), seed=0)
  one = pipeline.BatchShareSampler(base, 8, 0, 1, workers)
  two = [pipeline.BatchShareSampler(base, 8, p, 2, workers) for p in range(2)]
  a, b = (batches(s, 4, 20) for s in two)
  assert [x + y for x, y in zip(a, b)] == batches(one, 8, 20)
  # One process reads the base stream as it is (the single-host stream is unchanged).
  assert [one.global_index(i) for i in range(100)] == list(range(100))


def test_resume_from_state_gives_the_same_stream():
  def make():
    return pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=8, seed=3)
  a = make()
  for _ in range(4):   # Crosses an epoch boundary (20 records, batch 8).
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  want = [next(a) for _ in range(3)]
  b = make()
  b.set_state(state)
  for w in want:
    got = next(b)
    for k in w:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(w[k]))
  # Same seed from the start gives the same stream; another seed another one.
  first = np.asarray(next(make())["image"])
  np.testing.assert_array_equal(first, np.asarray(next(make())["image"]))
  other = pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=8, seed=4)
  assert not np.array_equal(first, np.asarray(next(other)["image"]))


def test_batch_size_checks():
  with pytest.raises(UserError, match="batch_size"):
    pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=12, seed=0)
  with pytest.raises(UserError, match="batch_size"):
    pipeline.GlobalBatches(IndexSource(4), Stamp(), mesh=_mesh(), batch_size=8, seed=0)


def test_classification_batches_on_scenes(tmp_path):
  from affinity_jax.data import sources
  cfg = dict(image_size=48, num_train=16, num_val=2)
  sources.prepare("scenes", str(tmp_path), **cfg)
  src = sources.open_split("scenes", "train", str(tmp_path), **cfg)
  b = next(pipeline.classification_batches(src, mesh=_mesh(), batch_size=8, seed=0,
                                           crop_size=48))
  assert b["image"].shape == (8, 48, 48, 3) and b["labels"].shape == (8, 20)
  assert b["image"].dtype == np.float32
  assert (np.asarray(b["labels"]).sum(1) >= 1).all()
  s = next(pipeline.segmentation_batches(src, None, mesh=_mesh(), batch_size=8, seed=0,
                                         crop_size=48))
  assert s["mask"].shape == (8, 48, 48) and s["mask"].dtype == np.uint8


def test_worker_processes_resume(tmp_path):
  from affinity_jax.data import sources
  cfg = dict(image_size=32, num_train=24, num_val=1)
  sources.prepare("scenes", str(tmp_path), **cfg)
  src = sources.open_split("scenes", "train", str(tmp_path), **cfg)

  def make():
    return pipeline.classification_batches(src, mesh=_mesh(), batch_size=8, seed=0,
                                           crop_size=32, worker_count=2)
  a = make()
  next(a)
  state = a.get_state()
  want = np.asarray(next(a)["image"])
  b = make()
  b.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(b)["image"]), want)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (8, 7), (17, 16), (224, 16)])
def test_default_worker_count_leaves_a_core_for_the_main_process(cpus, workers):
  assert pipeline.default_worker_count(cpus) == workers


def test_auto_worker_count_follows_this_process_cores(monkeypatch):
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
  assert pipeline.available_cpus() == 5
  assert pipeline.resolve_worker_count(pipeline.AUTO_WORKERS) == 4
  assert pipeline.resolve_worker_count(0) == 0 and pipeline.resolve_worker_count(3) == 3
  with pytest.raises(UserError, match="num_workers: -2"):
    pipeline.resolve_worker_count(-2)
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0})
  b = pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=8, seed=0,
                             worker_count=pipeline.AUTO_WORKERS)
  assert b.worker_count == 0


def test_resume_keeps_the_saved_worker_count():
  """A stream saved with 0 workers resumes identically on an iterator built for 2
  (e.g. `AUTO_WORKERS` on a host with more cores): the loader adopts the saved count."""
  def make(workers):
    return pipeline.GlobalBatches(IndexSource(20), Stamp(), mesh=_mesh(), batch_size=8,
                                  seed=3, worker_count=workers)
  a = make(0)
  next(a)
  state = json.loads(json.dumps(a.get_state()))
  assert state["worker_count"] == 0
  want = [np.asarray(next(a)["image"]) for _ in range(2)]
  b = make(2)
  assert b.worker_count == 2
  b.set_state(state)
  assert b.worker_count == 0
  for w in want:
    np.testing.assert_array_equal(np.asarray(next(b)["image"]), w)
