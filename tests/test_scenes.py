"""Generated scenes: masks match what was drawn, same seed same bytes, labels consistent."""

import glob
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from affinity_jax.data import scenes, sources
from affinity_jax.errors import UserError

PARAMS = scenes.SceneParams(image_size=64, num_classes=6, max_objects=3)


def _near(image, colour, tol=25):
  return (np.abs(image.astype(np.float32) - colour) <= tol).all(-1)


def _near_part(image, label, params):
  # A part pixel is the class colour on a stripe or 0.7 x it between stripes.
  c = scenes.class_colour(label, params.num_classes)
  return _near(image, c) | _near(image, 0.7 * c)


@pytest.mark.parametrize("index", range(12))
def test_mask_matches_what_was_drawn(index):
  image, mask, labels = scenes.render_scene(3, index, PARAMS)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert mask.shape == (64, 64) and mask.dtype == np.uint8
  present = sorted(set(np.unique(mask).tolist()) - {0})
  np.testing.assert_array_equal(np.nonzero(labels)[0] + 1, present)
  assert 1 <= len(present) and max(present) <= PARAMS.num_classes
  rgb = image.astype(np.int32)
  warm = rgb[..., 0] - rgb[..., 2] > 20   # Bodies are warm; the background is cool.
  assert not warm[mask == 0].any(), "background pixels look like an object"
  for k in range(1, PARAMS.num_classes + 1):
    part = _near_part(image, k, PARAMS)
    # Class k's colour appears exactly inside class k's mask ...
    assert (mask[part] == k).all()
    if k in present:
      assert part.sum() >= 4, "the discriminative part is visible"
      # ... and every pixel of class k is its body or its part.
      assert (warm | part)[mask == k].all()
      frac = part[mask == k].mean()
      assert 0.03 < frac < 0.6, frac


def test_part_is_small_and_objects_vary():
  areas, fracs, counts = [], [], []
  for i in range(60):
    image, mask, labels = scenes.render_scene(0, i, scenes.SceneParams())
    counts.append(labels.sum())
    for k in np.nonzero(labels)[0] + 1:
      areas.append((mask == k).sum())
      fracs.append(_near_part(image, k, scenes.SceneParams())[mask == k].mean())
  assert 0.1 < np.median(fracs) < 0.25
  assert np.std(areas) > 0.3 * np.mean(areas)
  assert set(counts) == {1, 2, 3}


def test_same_seed_same_bytes_other_seed_differs():
  a = scenes.render_scene(7, 5, PARAMS)
  b = scenes.render_scene(7, 5, PARAMS)
  c = scenes.render_scene(8, 5, PARAMS)
  for x, y in zip(a, b):
    assert x.tobytes() == y.tobytes()
  assert a[0].tobytes() != c[0].tobytes()


def test_bad_params():
  with pytest.raises(UserError, match="num_classes"):
    scenes.render_scene(0, 0, scenes.SceneParams(num_classes=21))


def test_builder_round_trip_and_bytes(tmp_path):
  cfg = dict(image_size=64, num_classes=6, num_train=10, num_val=4, seed=3)
  files = []
  for run in ("a", "b"):
    builder = sources.prepare("scenes", str(tmp_path / run), **cfg)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 10, "val": 4}
    files.append(sorted(glob.glob(os.path.join(os.fspath(builder.data_dir), "*.array_record*"))))
  for fa, fb in zip(*files):
    with open(fa, "rb") as f1, open(fb, "rb") as f2:
      assert f1.read() == f2.read(), "same seed gives the same bytes"
  ids = set()
  for split, offset in (("train", 0), ("val", 10)):
    src = sources.open_split("scenes", split, str(tmp_path / "a"), **cfg)
    for i in range(len(src)):
      ex = src[i]
      index = int(ex["id"].split("_")[1])
      assert offset <= index < offset + len(src)
      image, mask, labels = scenes.render_scene(3, index, PARAMS)
      np.testing.assert_array_equal(ex["image"], image)
      np.testing.assert_array_equal(ex["mask"], mask)
      np.testing.assert_array_equal(ex["labels"], labels)
      assert (ex["height"], ex["width"]) == (64, 64)
      ids.add(ex["id"])
  assert len(ids) == 14
  assert "tensorflow" not in sys.modules, "preparing and reading must not need TensorFlow"


def test_source_opens_once_under_concurrent_reads(tmp_path, monkeypatch):
  """grain reads from several threads per worker: one of them opens the files, once."""
  import tensorflow_datasets as tfds
  cfg = dict(image_size=32, num_train=4, num_val=1)
  sources.prepare("scenes", str(tmp_path), **cfg)
  src = pickle.loads(pickle.dumps(sources.open_split("scenes", "train", str(tmp_path), **cfg)))
  opened = []
  real = tfds.builder_from_directory

  def slow_open(path):
    opened.append(path)
    time.sleep(0.2)  # Every thread would reach the open while the first is still in it.
    return real(path)

  monkeypatch.setattr(tfds, "builder_from_directory", slow_open)
  ids = [None] * 8
  threads = [threading.Thread(target=lambda i=i: ids.__setitem__(i, src[i % 4]["id"]))
             for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert len(opened) == 1
  assert ids[:4] == ids[4:] and None not in ids


def test_unpickled_source_has_imported_tfds(tmp_path):
  """A worker imports tfds when it unpickles the source (its main thread, before reads)."""
  cfg = dict(image_size=32, num_train=4, num_val=1)
  sources.prepare("scenes", str(tmp_path), **cfg)
  blob = tmp_path / "source.pkl"
  blob.write_bytes(pickle.dumps(sources.open_split("scenes", "train", str(tmp_path), **cfg)))
  code = ("import pickle, sys; pickle.load(open(sys.argv[1], 'rb')); "
          "print('tensorflow_datasets' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert out.strip() == "True"


def test_preview_grid_shows_scenes_and_masks():
  grid = scenes.preview(3, PARAMS, rows=1, cols=2)
  assert grid.shape == (2 * 64 + 4, 2 * (64 + 4), 3)
  image, mask, _ = scenes.render_scene(3, 1, PARAMS)
  np.testing.assert_array_equal(grid[:64, 68:132], image)


def test_source_keeps_decoded_examples_read_only_within_its_budget(tmp_path, monkeypatch):
  cfg = dict(image_size=32, num_train=4, num_val=1)
  sources.prepare("scenes", str(tmp_path), **cfg)
  decoded = []
  real = sources.decode_example
  monkeypatch.setattr(sources, "decode_example", lambda raw: decoded.append(1) or real(raw))
  example = sources.open_split("scenes", "train", str(tmp_path), cache_bytes=0, **cfg)[0]
  one = sum(v.nbytes for v in example.values() if isinstance(v, np.ndarray))
  decoded.clear()
  src = sources.open_split("scenes", "train", str(tmp_path), cache_bytes=2 * one, **cfg)
  first = [src[i] for i in range(4)]
  again = [src[i] for i in range(4)]
  assert len(decoded) == 4 + 2   # Two fit the budget; the other two decode every time.
  for a, b in zip(first, again):
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["image"], b["image"])
  with pytest.raises(ValueError, match="read-only"):
    again[0]["image"][0, 0] = 0   # A transform writing in place would corrupt the cache.
  again[0]["image"] = None        # The dict is the caller's own.
  assert src[0]["image"] is not None
  # A worker process gets the source without the cache, and its whole budget.
  copy = pickle.loads(pickle.dumps(src))
  decoded.clear()
  for i in list(range(4)) * 2:
    copy[i]
  assert len(decoded) == 4 + 2
