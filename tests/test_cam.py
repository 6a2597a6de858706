"""CAMs, the multi-scale + flip merge and the label maps against NumPy transcriptions."""

import functools

import jax
import numpy as np

from affinity_jax.inference import cam as cam_inference
from affinity_jax.ops import cam


def _np_resize(x, out_h, out_w, valid_h, valid_w):
  """Bilinear, half-pixel centres, edge clamped (torch align_corners=False), of the
  first valid_h x valid_w cells (fractional allowed) of x [h, w, K] onto out_h x out_w."""
  def axis(n_out, n_valid, n_in):
    src = np.maximum((np.arange(n_out) + 0.5) * n_valid / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  y0, y1, ly = axis(out_h, valid_h, x.shape[0])
  x0, x1, lx = axis(out_w, valid_w, x.shape[1])
  top = x[y0][:, x0] * (1 - lx)[None, :, None] + x[y0][:, x1] * lx[None, :, None]
  bot = x[y1][:, x0] * (1 - lx)[None, :, None] + x[y1][:, x1] * lx[None, :, None]
  return top * (1 - ly)[:, None, None] + bot * ly[:, None, None]


def test_cam_from_features():
  rng = np.random.default_rng()
  f = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  w = rng.normal(size=(6, 20)).astype(np.float32)
  want = np.maximum(np.einsum("bhwc,ck->bhwk", f.astype(np.float64), w), 0)
  np.testing.assert_allclose(np.asarray(cam.cam_from_features(f, w)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cam.cam_from_features(f, w, sqrt=True)),
                             np.sqrt(want), atol=1e-3)


def test_grouped_cams_sums_relu_maps_per_group():
  rng = np.random.default_rng()
  f = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  groups = np.zeros((5, 3), np.float32)
  groups[[0, 1, 2, 3, 4], [2, 0, 2, 0, 1]] = 1
  maps = np.maximum(np.einsum("bhwc,ck->bhwk", f.astype(np.float64), w), 0)
  want = np.stack([maps[..., [1, 3]].sum(-1), maps[..., 4], maps[..., [0, 2]].sum(-1)], -1)
  np.testing.assert_allclose(np.asarray(cam.grouped_cams(f, w, groups)), want, atol=1e-5)


def test_pass_plan_pads_to_multiple_of_8():
  plan = cam.pass_plan(37, 50)
  assert [(p.scale, p.flip) for p in plan] == [
      (s, f) for s in (1.0, 0.5, 1.5, 2.0) for f in (False, True)]
  assert plan[4].size == (56, 75) and plan[4].padded == (56, 80)
  assert all(p.padded[0] % 8 == 0 and p.padded[1] % 8 == 0 for p in plan)


def test_merge_matches_numpy():
  rng = np.random.default_rng()
  b, size = 2, (37, 50)
  plan = cam.pass_plan(*size)
  cams = [rng.uniform(size=(b, p.padded[0] // 8, p.padded[1] // 8, 20)).astype(np.float32)
          for p in plan]
  labels = (rng.uniform(size=(b, 20)) < 0.3).astype(np.float32)
  labels[:, 4] = 1
  merge = jax.jit(functools.partial(cam.merge_cams, plan=tuple(plan), size=size))
  got = np.asarray(merge(cams, labels=labels))
  for i in range(b):
    total = 0
    for c, p in zip(cams, plan):
      up = _np_resize(c[i].astype(np.float64), *size, p.size[0] / 8, p.size[1] / 8)
      if p.flip:
        up = up[:, ::-1]
      total = total + up * labels[i]
    want = total / (total.max(axis=(0, 1)) + 1e-5)
    np.testing.assert_allclose(got[i], want, atol=1e-5)
  np.testing.assert_array_equal(got.transpose(0, 3, 1, 2)[labels == 0], 0)

  bg = np.asarray(cam.background_score(got, 16))
  np.testing.assert_allclose(bg, (1 - got.astype(np.float64).max(-1)) ** 16, atol=1e-5)
  full = np.asarray(cam.with_background(got, 16))
  assert full.shape == (b, *size, 21)
  np.testing.assert_allclose(full[..., 0], bg)
  lab = np.asarray(cam.cam_label_map(got, 0.2))
  want_lab = np.argmax(np.concatenate([np.full(got.shape[:-1] + (1,), 0.2), got], -1), -1)
  np.testing.assert_array_equal(lab, want_lab)
  assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0} | set(np.nonzero(labels)[1] + 1)


def test_host_merge_of_present_classes_matches_numpy_and_the_jitted_merge():
  rng = np.random.default_rng()
  size = (37, 50)
  plan = cam.pass_plan(*size)
  cams = [rng.uniform(size=(p.padded[0] // 8 + 1, p.padded[1] // 8 + 2, 20))
          .astype(np.float32) for p in plan]   # Extra cells: padding past the multiple.
  present = np.array([2, 4, 17])
  got = cam_inference.merge_present([c[..., present] for c in cams], plan, size)
  assert got.shape == (*size, 3) and got.dtype == np.float32
  total = 0
  for c, p in zip(cams, plan):
    up = _np_resize(c[..., present].astype(np.float64), *size, p.size[0] / 8, p.size[1] / 8)
    total = total + (up[:, ::-1] if p.flip else up)
  np.testing.assert_allclose(got, total / (total.max(axis=(0, 1)) + 1e-5), atol=1e-5)
  labels = np.zeros((1, 20), np.float32)
  labels[0, present] = 1
  merge = jax.jit(functools.partial(cam.merge_cams, plan=tuple(plan), size=size))
  want = np.asarray(merge([c[None] for c in cams], labels=labels))[0]
  np.testing.assert_allclose(cam.full_cams(got, present + 1), want, atol=1e-5)


def test_flip_pass_is_unflipped():
  rng = np.random.default_rng()
  c = rng.uniform(size=(1, 4, 5, 3)).astype(np.float32)
  a = np.asarray(cam.upsample_cam(c, (32, 40)))
  b = np.asarray(cam.upsample_cam(c[:, :, ::-1], (32, 40), flip=True))
  np.testing.assert_allclose(a, b, atol=1e-6)
