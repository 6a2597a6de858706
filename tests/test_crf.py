"""Host dense CRF: shapes, normalisation, edge snapping, and the resumable worker pool."""

import os
import sys

import numpy as np
import pytest

from affinity_jax.errors import UserError
from affinity_jax.labels import crf, store


def _two_halves(h=32, w=48):
  image = np.zeros((h, w, 3), np.uint8)
  image[:, w // 2:] = 255
  return image


def test_shapes_keys_and_marginals_sum_to_one():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
  cams = rng.random((20, 28, 2)).astype(np.float32)
  la, ha, keys = crf.crf_low_high(image, cams, [15, 3])
  assert la.shape == ha.shape == (20, 28, 3) and la.dtype == np.float32
  np.testing.assert_array_equal(keys, [0, 3, 15])
  np.testing.assert_allclose(la.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(ha.sum(-1), 1.0, atol=1e-4)
  # High alpha shrinks the background score, so background wins less often.
  assert (ha.argmax(-1) == 0).mean() < (la.argmax(-1) == 0).mean()


def test_channels_follow_sorted_keys():
  image = _two_halves()
  cams = np.zeros((32, 48, 2), np.float32)
  cams[:, 24:, 0] = 0.9  # label 7 on the right
  cams[:, :24, 1] = 0.9  # label 2 on the left
  la, _, keys = crf.crf_low_high(image, cams, [7, 2])
  np.testing.assert_array_equal(keys, [0, 2, 7])
  lab = keys[la.argmax(-1)]
  assert (lab[:, :24] == 2).all() and (lab[:, 24:] == 7).all()


def test_crf_snaps_blurry_boundary_to_image_edge():
  h, w = 32, 48
  image = _two_halves(h, w)
  fg = np.clip(0.5 + (np.arange(w) - 16) / w * 0.6, 0, 1)[None, :].repeat(h, 0)
  probs = np.stack([1 - fg, fg], -1).astype(np.float32)
  truth = np.arange(w)[None, :].repeat(h, 0) >= w // 2
  raw = (probs.argmax(-1) == 1) == truth
  out = crf.dense_crf(image, probs)
  assert out.shape == (h, w, 2)
  snapped = (out.argmax(-1) == 1) == truth
  assert raw.mean() < 0.9 and snapped.mean() > 0.98


def test_unary_weight_sets_how_far_the_pairwise_terms_move_labels():
  h, w = 32, 48
  image = _two_halves(h, w)
  fg = np.clip(0.5 + (np.arange(w) - 16) / w * 0.6, 0, 1)[None, :].repeat(h, 0)
  probs = np.stack([1 - fg, fg], -1).astype(np.float32)
  moved = lambda q: (q.argmax(-1) != probs.argmax(-1)).mean()
  default = crf.dense_crf(image, probs)
  assert np.array_equal(crf.dense_crf(image, probs, unary_weight=1.0), default)
  assert moved(default) > 0.1  # snapped to the image edge, as above
  assert moved(crf.dense_crf(image, probs, unary_weight=1000.0)) == 0


def _load(i):
  rng = np.random.default_rng(int(i))
  return (rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
          rng.random((12, 16, 1)).astype(np.float32), [int(i) % 20 + 1])


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_writes_all_and_skips_done(tmp_path, workers):
  out = str(tmp_path / "crf")
  assert crf.run_pool(["1", "2"], _load, out, workers=workers, progress=False) == 2
  before = os.path.getmtime(store.path(out, "1"))
  calls = []
  loader = lambda i: calls.append(i) or _load(i)
  assert crf.run_pool(["1", "2", "3"], loader, out, workers=workers, progress=False) == 1
  assert calls == ["3"]
  assert os.path.getmtime(store.path(out, "1")) == before
  assert sorted(os.listdir(out)) == ["1.npz", "2.npz", "3.npz"]  # no temporaries left
  la, ha, keys = store.load(out, "3")
  ref = crf.crf_low_high(*_load("3"))
  np.testing.assert_allclose(la, ref[0], atol=0.5 / 255 + 1e-6)
  np.testing.assert_array_equal(keys, ref[2])


def test_failed_job_leaves_no_file(tmp_path):
  out = str(tmp_path / "crf")

  def bad(i):
    image, cams, keys = _load(i)
    return image[:5], cams, keys  # Mismatched image size: the CRF raises.

  with pytest.raises(ValueError):
    crf.run_pool(["1"], bad, out, workers=1, progress=False)
  assert not os.path.exists(out) or os.listdir(out) == []


def test_missing_pydensecrf_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  with pytest.raises(UserError, match="pip install pydensecrf2"):
    crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 2), 0.5, np.float32))


def test_write_interrupted_leaves_nothing_and_rerun_completes(tmp_path, monkeypatch):
  out = str(tmp_path / "crf")

  def crash(fd):
    raise OSError("disk gone")

  monkeypatch.setattr("affinity_jax.io.os.fsync", crash)
  with pytest.raises(OSError, match="disk gone"):
    crf.run_pool(["4"], _load, out, workers=1, progress=False)
  assert os.listdir(out) == []  # neither the result nor a temporary file
  monkeypatch.undo()
  assert crf.run_pool(["4"], _load, out, workers=1, progress=False) == 1
  assert store.exists(out, "4")


@pytest.mark.parametrize("workers", [0, 2])
def test_walk_crf_jobs_write_labels_in_order(tmp_path, workers):
  from PIL import Image
  rng = np.random.default_rng(0)
  image = _two_halves()
  scores = np.zeros((32, 48, 2), np.float32)
  scores[..., 0] = 0.5                                        # background everywhere
  scores[:, 20:, 1] = 0.6 + 0.1 * rng.random((32, 28))        # blurry object on the right
  jobs = [(str(tmp_path / f"{i}.png"), image, scores, np.array([0, 9], np.uint8))
          for i in range(4)]
  done = []
  assert crf.map_jobs(crf.label_png, iter(jobs), workers, done.append) == 4
  assert done == [job[0] for job in jobs]                     # In the order of the jobs.
  label = np.asarray(Image.open(done[0]))
  # The CRF snaps the object to the image's edge at column 24; labels are the keys.
  assert (label[:, :24] == 0).all() and (label[:, 24:] == 9).all()
