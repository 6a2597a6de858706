"""Offsets of the forward half-disk and the pair masks of the two border modes."""

import numpy as np
import pytest

from affinity_jax.ops import neighbors


@pytest.mark.parametrize("radius,count", zip(range(2, 11), [4, 12, 22, 34, 54, 72, 96, 124, 152]))
def test_half_disk_count(radius, count):
  offs = neighbors.half_disk_offsets(radius)
  assert offs.shape == (count, 2) and offs.dtype == np.int32
  assert neighbors.half_disk_radius(count) == radius


def test_half_disk_order_and_halfness():
  r = 5
  offs = [tuple(o) for o in neighbors.half_disk_offsets(r)]
  expected = [(0, dx) for dx in range(1, r)] + [
      (dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r]
  assert offs == expected
  full = {(dy, dx) for dy in range(-r + 1, r) for dx in range(-r + 1, r)
          if 0 < dy * dy + dx * dx < r * r}
  # Each undirected pair exactly once.
  assert set(offs) | {(-a, -b) for a, b in offs} == full
  assert not set(offs) & {(-a, -b) for a, b in offs}


@pytest.mark.parametrize("border", ["full", "reference"])
def test_pair_mask(border):
  r, h, w = 4, 9, 11
  offs = neighbors.half_disk_offsets(r)
  mask = np.asarray(neighbors.pair_mask(offs, h, w, border))
  for k, (dy, dx) in enumerate(offs):
    for y in range(h):
      for x in range(w):
        inside = 0 <= y + dy < h and 0 <= x + dx < w
        if border == "reference":
          inside = y <= h - r and r - 1 <= x <= w - r
        assert mask[k, y, x] == inside


def test_pair_mask_valid_gives_each_image_its_own_region():
  r, h, w = 3, 8, 9
  offs = neighbors.half_disk_offsets(r)
  valid = np.zeros((1, h, w), bool)
  valid[0, :6, :7] = True
  for border in ("full", "reference"):
    got = np.asarray(neighbors.pair_mask(offs, h, w, border, valid))[0]
    small = np.asarray(neighbors.pair_mask(offs, 6, 7, border))
    assert not got[:, 6:].any() and not got[:, :, 7:].any()
    np.testing.assert_array_equal(got[:, :6, :7], small)


def test_shift_channels_matches_a_loop_over_channels():
  rng = np.random.default_rng()
  offs = np.concatenate([neighbors.half_disk_offsets(4), -neighbors.half_disk_offsets(4)])
  x = rng.normal(size=(2, 7, 10, len(offs))).astype(np.float32)
  got = np.asarray(neighbors.shift_channels(x, offs, fill=-1.0))
  for k, (dy, dx) in enumerate(offs):
    for y in range(7):
      for xx in range(10):
        inside = 0 <= y + dy < 7 and 0 <= xx + dx < 10
        want = x[:, y + dy, xx + dx, k] if inside else -1.0
        np.testing.assert_array_equal(got[:, y, xx, k], want)
