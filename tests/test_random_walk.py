"""The banded random walk against a dense N x N transition matrix and its powers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax.ops import affinity, neighbors, random_walk


def _dense_transition(feats, radius, beta, border):
  """T = D^-1 A, A = W^beta over both directions of every pair plus self-loops of 1."""
  h, w, _ = feats.shape
  f = feats.astype(np.float64)
  a = np.eye(h * w)
  for y in range(h):
    for x in range(w):
      if border == "reference" and not (y <= h - radius and radius - 1 <= x <= w - radius):
        continue
      for dy, dx in neighbors.half_disk_offsets(radius):
        if 0 <= y + dy < h and 0 <= x + dx < w:
          v = np.exp(-np.abs(f[y, x] - f[y + dy, x + dx]).mean()) ** beta
          a[y * w + x, (y + dy) * w + x + dx] = a[(y + dy) * w + x + dx, y * w + x] = v
  return a / a.sum(axis=1, keepdims=True)


def _dense_walk(cams, feats, radius, beta, t, border):
  h, w, c = cams.shape
  tm = _dense_transition(feats, radius, beta, border)
  return (np.linalg.matrix_power(tm, t) @ cams.reshape(h * w, c).astype(np.float64)
          ).reshape(h, w, c)


# 21 channels in groups of 16 and 5 (AVX-512) or 8, 8 and 5 (AVX2), as `propagate`
# walks them on CPU.
@pytest.mark.parametrize("size, group", [((6, 9, 3), None), ((11, 8, 21), 16),
                                         ((11, 8, 21), 8)])
@pytest.mark.parametrize("border", ["full", "reference"])
def test_propagate_matches_dense_matrix_power(size, group, border):
  rng = np.random.default_rng()
  h, w, c = size
  feats = (rng.normal(size=(2, h, w, 6)) * 0.3).astype(np.float32)
  cams = rng.uniform(size=(2, h, w, c)).astype(np.float32)
  offs = neighbors.half_disk_offsets(4)
  wts = random_walk.transition_weights(affinity.pairwise_affinity(feats, offs), offs, 8, border)
  walk = jax.jit(lambda c, t: random_walk.apply_transition(wts, c, offs, t, group))
  for t in (0, 1, 7, 256):
    got = np.asarray(walk(cams, t))
    for i in range(2):
      want = _dense_walk(cams[i], feats[i], 4, 8, t, border)
      np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f"t={t}")


def test_t0_is_identity_and_rows_sum_to_one():
  rng = np.random.default_rng()
  h, w, r = 7, 8, 5
  offs = neighbors.half_disk_offsets(r)
  feats = rng.normal(size=(1, h, w, 4)).astype(np.float32)
  cams = rng.uniform(size=(1, h, w, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(random_walk.propagate(cams, feats, t=0)), cams)
  with pytest.raises(ValueError):
    random_walk.apply_transition(jnp.zeros((1, h, w, 69)), cams, offs, -1)
  for border in ("full", "reference"):
    wts = random_walk.transition_weights(affinity.pairwise_affinity(feats, offs), offs, 8,
                                         border)
    np.testing.assert_allclose(np.asarray(wts).sum(axis=-1), 1.0, atol=1e-6)
    # The banded rows are the rows of the dense T.
    dense = _dense_transition(feats[0], r, 8, border)
    banded = np.zeros_like(dense)
    for n, (dy, dx) in enumerate(random_walk.walk_offsets(offs)):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w:
            banded[y * w + x, (y + dy) * w + x + dx] += wts[0, y, x, n]
          else:
            assert wts[0, y, x, n] == 0
    np.testing.assert_allclose(banded, dense, atol=1e-6)


@pytest.mark.parametrize("border", ["full", "reference"])
def test_padded_batch_equals_single_images(border):
  rng = np.random.default_rng()
  sizes, (hp, wp) = [(9, 7), (6, 10)], (10, 12)
  feats = np.zeros((2, hp, wp, 5), np.float32)
  cams = np.zeros((2, hp, wp, 3), np.float32)
  valid = np.zeros((2, hp, wp), bool)
  singles = []
  for i, (h, w) in enumerate(sizes):
    f = rng.normal(size=(1, h, w, 5)).astype(np.float32)
    c = rng.uniform(size=(1, h, w, 3)).astype(np.float32)
    feats[i, :h, :w], cams[i, :h, :w], valid[i, :h, :w] = f[0], c[0], True
    # Junk in the padding must not leak in.
    feats[i, h:], cams[i, h:] = 5.0, 100.0
    singles.append(np.asarray(random_walk.propagate(c, f, radius=3, t=20, border=border))[0])
  got = np.asarray(random_walk.propagate(cams, feats, radius=3, t=20, border=border,
                                         valid=valid))
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(got[i, :h, :w], singles[i], atol=1e-5)
    np.testing.assert_array_equal(got[i][~valid[i]], cams[i][~valid[i]])


def test_weights_reused_across_t_and_vmap():
  rng = np.random.default_rng()
  offs = neighbors.half_disk_offsets(3)
  feats = rng.normal(size=(3, 6, 7, 4)).astype(np.float32)
  cams = rng.uniform(size=(3, 6, 7, 2)).astype(np.float32)
  wts = random_walk.transition_weights(affinity.pairwise_affinity(feats, offs), offs, 8)
  step = jax.jit(functools.partial(random_walk.apply_transition, offsets=offs, t=3))
  twice = step(wts, step(wts, cams))
  once = random_walk.apply_transition(wts, cams, offs, 6)
  np.testing.assert_allclose(np.asarray(twice), np.asarray(once), atol=1e-6)
  per_image = jax.vmap(lambda c, f: random_walk.propagate(c[None], f[None], radius=3, t=6)[0])
  np.testing.assert_allclose(
      np.asarray(per_image(cams, feats)),
      np.asarray(random_walk.propagate(cams, feats, radius=3, t=6)), atol=1e-6)


def test_traced_t_equals_static_t():
  rng = np.random.default_rng()
  offs = neighbors.half_disk_offsets(3)
  feats = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
  cams = rng.uniform(size=(1, 5, 6, 3)).astype(np.float32)
  wts = random_walk.transition_weights(affinity.pairwise_affinity(feats, offs), offs, 8)
  traced = jax.jit(lambda w, x, t: random_walk.apply_transition(w, x, offs, t))
  for t in (0, 1, 4, 5):
    np.testing.assert_allclose(
        np.asarray(traced(wts, cams, jnp.int32(t))),
        np.asarray(random_walk.apply_transition(wts, cams, offs, t)), atol=1e-6)


def test_radius_one_has_only_self_loops():
  rng = np.random.default_rng()
  cams = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
  feats = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(random_walk.propagate(cams, feats, radius=1, t=5)), cams)


@pytest.mark.parametrize("cpuinfo, xla_flags, lanes", [
    ("flags\t: fpu sse avx avx2 fma\n", "", 8),
    ("flags\t: fpu avx avx2 avx512f avx512bw\n", "", 16),
    # The XLA flag that emulates an AVX2 machine on an AVX-512 one caps the vectors.
    ("flags\t: fpu avx avx2 avx512f avx512bw\n", "--xla_cpu_max_isa=AVX2", 8),
    ("flags\t: fpu avx avx2 avx512f\n", "--xla_dump_to=/tmp/d --xla_cpu_max_isa=avx512_vnni", 16),
    ("flags\t: fpu avx avx2\n", "--xla_cpu_max_isa=AVX512F", 8),   # Not there to use.
    ("", "", 8),
])
def test_cpu_vector_lanes_follow_the_cpu_and_xla_flags(cpuinfo, xla_flags, lanes):
  assert random_walk.cpu_vector_lanes(cpuinfo, xla_flags) == lanes
