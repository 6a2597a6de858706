"""Affinities, pair labels and the AffinityNet loss against plain NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax.ops import affinity, neighbors


@pytest.mark.parametrize("shape, chunk", [((2, 7, 9, 5), 256), ((2, 7, 9, 5), 7),
                                          ((3, 6, 2, 3), 5), ((1, 11, 8, 4), 40)])
def test_pairwise_affinity_matches_double_loop(shape, chunk):
  rng = np.random.default_rng()
  b, h, w, d = shape
  r = 4
  f = rng.normal(size=(b, h, w, d)).astype(np.float32)
  offs = neighbors.half_disk_offsets(r)
  got = np.asarray(jax.jit(lambda x: affinity.pairwise_affinity(x, offs, chunk))(f))
  assert got.shape == (b, len(offs), h, w)
  f64 = f.astype(np.float64)
  want = np.zeros(got.shape)
  for i in range(b):
    for k, (dy, dx) in enumerate(offs):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w:
            want[i, k, y, x] = np.exp(-np.abs(f64[i, y, x] - f64[i, y + dy, x + dx]).mean())
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Read in both directions: W(p, q) computed from q's side is the same number.
  g = f[:, ::-1, ::-1]
  back = np.asarray(affinity.pairwise_affinity(g, -offs, chunk))[:, :, ::-1, ::-1]
  for k, (dy, dx) in enumerate(offs):
    for y in range(max(0, -dy), min(h, h - dy)):
      for x in range(max(0, -dx), min(w, w - dx)):
        np.testing.assert_allclose(got[:, k, y, x], back[:, k, y, x], atol=1e-6)


def _dense_affinity(f, offs):
  """The affinities by whole-map shifts, for jax.grad to differentiate on its own."""
  b, h, w, _ = f.shape
  out = []
  for dy, dx in offs:
    pad = jnp.pad(f, ((0, 0), (max(0, -dy), max(0, dy)), (max(0, -dx), max(0, dx)), (0, 0)))
    y0, x0 = max(0, -dy) + dy, max(0, -dx) + dx
    out.append(jnp.exp(-jnp.mean(jnp.abs(f - pad[:, y0:y0 + h, x0:x0 + w]), -1)))
  return jnp.where(neighbors.pair_mask(offs, h, w, "full")[None], jnp.stack(out, 1), 0)


@pytest.mark.parametrize("shape, r, chunk", [((2, 7, 9, 5), 4, 256), ((2, 7, 9, 5), 4, 7),
                                             ((3, 6, 2, 3), 2, 5), ((2, 9, 10, 6), 12, 16)])
@pytest.mark.parametrize("ties", [False, True])
def test_pairwise_affinity_gradient_matches_autodiff_of_dense_shifts(shape, r, chunk, ties):
  # The hand-written backward against jax.grad of a plain formulation: chunks that
  # overlap at the end, pairs past the map and across images, and (ties) equal features,
  # where |x|'s derivative at 0 must be taken as jax takes it.
  rng = np.random.default_rng(0)
  f = rng.normal(size=shape).astype(np.float32)
  if ties:
    f = np.round(f)
  offs = neighbors.half_disk_offsets(r)
  weight = rng.normal(size=(shape[0], len(offs)) + shape[1:3]).astype(np.float32)
  got = jax.jit(jax.grad(lambda x: jnp.sum(affinity.pairwise_affinity(x, offs, chunk) * weight)))(f)
  want = jax.grad(lambda x: jnp.sum(_dense_affinity(x, offs) * weight))(f)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=2e-6)


def _np_labels(lab, offs, border, r):
  b, h, w = lab.shape
  out = {n: np.zeros((b, len(offs), h, w), bool) for n in ("bg_pos", "fg_pos", "neg")}
  for i in range(b):
    for k, (dy, dx) in enumerate(offs):
      for y in range(h):
        for x in range(w):
          if border == "reference" and not (y <= h - r and r - 1 <= x <= w - r):
            continue
          if not (0 <= y + dy < h and 0 <= x + dx < w):
            continue
          a, c = int(lab[i, y, x]), int(lab[i, y + dy, x + dx])
          if a == 255 or c == 255:
            continue
          out["bg_pos"][i, k, y, x] = a == c == 0
          out["fg_pos"][i, k, y, x] = a == c and a > 0
          out["neg"][i, k, y, x] = a != c
  return out


@pytest.mark.parametrize("border", ["full", "reference"])
@pytest.mark.parametrize("r", [5, 12])   # 12: pairs longer than the 9x10 map is wide
def test_labels_and_loss_match_spec(border, r):
  rng = np.random.default_rng()
  b, h, w = 2, 9, 10
  offs = neighbors.half_disk_offsets(r)
  lab = rng.choice(np.array([0, 0, 3, 3, 7, 255], np.uint8), size=(b, h, w))
  got = affinity.affinity_labels(lab, offs, border=border)
  want = _np_labels(lab, offs, border, r)
  for n in want:
    np.testing.assert_array_equal(np.asarray(got[n]), want[n], err_msg=n)
  aff = rng.uniform(0, 1, size=(b, len(offs), h, w)).astype(np.float32)
  loss, aux = jax.jit(lambda a, l: affinity.affinity_loss(a, l, border=border))(aff, got)
  a64 = aff.astype(np.float64)
  terms = {}
  for n, lp in (("bg", np.log(a64 + 1e-5)), ("fg", np.log(a64 + 1e-5)),
                ("neg", np.log(1 + 1e-5 - a64))):
    sel = want["neg" if n == "neg" else f"{n}_pos"]
    terms[n] = -np.sum(sel * lp) / (sel.sum() + 1e-5)
    np.testing.assert_allclose(float(aux[f"{n}_loss"]), terms[n], rtol=1e-5)
    assert float(aux[f"{n}_count"]) == sel.sum()
  np.testing.assert_allclose(float(loss), terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2,
                             rtol=1e-5)


def test_reference_loss_masks_full_labels():
  rng = np.random.default_rng()
  offs = neighbors.half_disk_offsets(5)
  lab = rng.choice(np.array([0, 2], np.uint8), size=(1, 9, 10))
  aff = rng.uniform(0, 1, size=(1, len(offs), 9, 10)).astype(np.float32)
  full = affinity.affinity_labels(lab, offs, border="full")
  ref = affinity.affinity_labels(lab, offs, border="reference")
  a = affinity.affinity_loss(aff, full, border="reference")[0]
  b = affinity.affinity_loss(aff, ref, border="reference")[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_pairwise_affinity_of_nothing():
  offs = neighbors.half_disk_offsets(3)
  assert affinity.pairwise_affinity(np.zeros((0, 4, 5, 2), np.float32), offs).shape == (
      0, len(offs), 4, 5)
  assert affinity.pairwise_affinity(np.ones((1, 4, 5, 2), np.float32), offs[:0]).shape == (
      1, 0, 4, 5)
