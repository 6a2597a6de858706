"""CRF store: round trip, errors, and affinity labels from the uint8 form vs full precision.

The 1/8 label-map rule and the pair rule are transcribed here directly from the spec
(stage 2) so the check does not depend on the ops/data implementations.
"""

import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from affinity_jax.errors import UserError
from affinity_jax.labels import crf, store

def test_round_trip_and_exists(tmp_path):
  rng = np.random.default_rng(0)
  la = rng.dirichlet(np.ones(3), (9, 7)).astype(np.float32)
  ha = rng.dirichlet(np.ones(3), (9, 7)).astype(np.float32)
  d = str(tmp_path)
  assert not store.exists(d, "a")
  store.save(d, "a", la, ha, [0, 4, 9])
  assert store.exists(d, "a")
  la2, ha2, keys = store.load(d, "a")
  assert la2.dtype == np.float32 and la2.shape == (9, 7, 3)
  np.testing.assert_array_equal(keys, [0, 4, 9])
  assert np.abs(la2 - la).max() <= 0.5 / 255 + 1e-6
  assert np.abs(ha2 - ha).max() <= 0.5 / 255 + 1e-6
  with np.load(store.path(d, "a")) as z:
    assert z["la"].dtype == np.uint8


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(UserError, match="missing"):
    store.load(str(tmp_path), "nope")
  (tmp_path / "bad.npz").write_bytes(b"not an npz")
  with pytest.raises(UserError, match="bad.npz"):
    store.load(str(tmp_path), "bad")


def test_save_rejects_inconsistent_arrays(tmp_path):
  x = np.zeros((4, 4, 2), np.float32)
  with pytest.raises(ValueError):
    store.save(str(tmp_path), "a", x, x, [0, 1, 2])


# --- affinity labels from the stored form ---------------------------------------

def _offsets(r=5):
  out = [(0, dx) for dx in range(1, r)]
  out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r]
  return out


def _label_map(la, ha, keys, y0, x0, size):
  """Spec stage 2: joint crop (zero fill), 8x8 average pool, la/ha background rules."""
  def crop_pool(p):
    c = np.zeros((size, size, p.shape[-1]), np.float32)
    part = p[y0:y0 + size, x0:x0 + size]
    c[:part.shape[0], :part.shape[1]] = part
    return c.reshape(size // 8, 8, size // 8, 8, -1).mean(axis=(1, 3))
  pla, pha = crop_pool(la), crop_pool(ha)
  arg_la, arg_ha = pla.argmax(-1), pha.argmax(-1)
  label = keys[arg_la].astype(np.int32)
  label[arg_la == 0] = 255
  label[arg_ha == 0] = 0
  label[pla.max(-1) < 1e-5] = 255
  return label


def _pair_classes(label):
  """0 = unused pair (an end is 255), 1 = bg_pos, 2 = fg_pos, 3 = neg; every in-map pair."""
  h, w = label.shape
  out = []
  for dy, dx in _offsets():
    a = label[0:h - dy, max(0, -dx):w - max(0, dx)]
    b = label[dy:h, max(0, dx):w - max(0, -dx)]
    used = (a < 255) & (b < 255)
    c = np.where(a == b, np.where(a == 0, 1, 2), 3)
    out.append(np.where(used, c, 0).reshape(-1))
  return np.concatenate(out)


def _synthetic_case(seed, h=96, w=128):
  """A textured image with coloured blobs, and blurry, displaced CAMs of the blobs."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  image = (rng.normal(110, 20, (h, w, 3))).clip(0, 255)
  keys = np.sort(rng.choice(np.arange(1, 21), 2, replace=False))
  cams = []
  for _ in keys:
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    image[blob] = rng.uniform(0, 255, 3) + rng.normal(0, 15, (blob.sum(), 3))
    cam = ndimage.gaussian_filter(np.roll(blob.astype(np.float32), 4, axis=1), 6)
    cam *= rng.uniform(0.7, 1.0, (h, w))
    cams.append(cam / (cam.max() + 1e-5))
  return image.clip(0, 255).astype(np.uint8), np.stack(cams, -1), keys


def _voc_case(voc, name):
  image = np.asarray(Image.open(f"{voc}/JPEGImages/{name}.jpg").convert("RGB"))
  mask = np.asarray(Image.open(f"{voc}/SegmentationClass/{name}.png"))
  keys = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}))
  rng = np.random.default_rng(len(name))
  cams = []
  for k in keys:
    cam = ndimage.gaussian_filter((mask == k).astype(np.float32), 12)
    cam *= rng.uniform(0.6, 1.0, cam.shape)
    cams.append(cam / (cam.max() + 1e-5))
  return image, np.stack(cams, -1), keys


def _agreement(tmp_path, case, crop, rng):
  image, cams, keys = case
  la, ha, k = crf.crf_low_high(image, cams, keys)
  store.save(str(tmp_path), "x", la, ha, k)
  qla, qha, qk = store.load(str(tmp_path), "x")
  h, w = la.shape[:2]
  y0, x0 = rng.integers(0, max(1, h - crop) + 1), rng.integers(0, max(1, w - crop) + 1)
  full = _pair_classes(_label_map(la, ha, k, y0, x0, crop))
  quant = _pair_classes(_label_map(qla, qha, qk, y0, x0, crop))
  assert (full > 0).mean() > 0.2  # the labels are informative, not all ignored
  assert {2, 3} <= set(np.unique(full).tolist())
  return (full == quant).sum(), full.size


def _assert_agree(tmp_path, cases):
  rng = np.random.default_rng(0)
  same = total = 0
  for case, crop in cases:
    s, t = _agreement(tmp_path, case, crop, rng)
    same, total = same + s, total + t
  print(f"pair-label agreement {same / total:.5f} over {total} pairs")
  assert same / total >= 0.99


def test_affinity_labels_from_store_agree_with_full_precision(tmp_path):
  _assert_agree(tmp_path, [(_synthetic_case(s), 96) for s in range(4)])


def test_affinity_labels_from_store_agree_on_real_photos(voc_sample, tmp_path):
  voc = os.path.join(voc_sample, "VOC2012")
  names = sorted(f[:-4] for f in os.listdir(f"{voc}/SegmentationClass"))[:3]
  _assert_agree(tmp_path, [(_voc_case(voc, n), 448) for n in names])
