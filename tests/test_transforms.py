"""NumPy transforms against direct computations."""

import numpy as np
import pytest

from affinity_jax.data import transforms


def test_normalize_both_conventions():
  img = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
  x = transforms.normalize(img, "imagenet_rgb")
  np.testing.assert_allclose(x[1, 2, 0], (img[1, 2, 0] / 255 - 0.485) / 0.229, rtol=1e-5)
  y = transforms.normalize(img, "caffe_bgr")
  np.testing.assert_allclose(y[1, 2], [img[1, 2, 2] - 104.008, img[1, 2, 1] - 116.669,
                                       img[1, 2, 0] - 122.675], rtol=1e-5)
  with pytest.raises(ValueError):
    transforms.normalize(img, "bgr")


def test_normalize_gives_the_bits_of_the_plain_formula():
  """Normalising in place must not change a bit of what training and inference see."""
  img = np.random.default_rng(1).integers(0, 256, (37, 41, 3), dtype=np.uint8)
  x = img.astype(np.float32)
  want = {"imagenet_rgb": (x / 255.0 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD,
          "caffe_bgr": x[..., ::-1] - transforms.CAFFE_BGR_MEAN}
  for name, w in want.items():
    got = transforms.normalize(img, name)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), w.view(np.uint32))


def test_long_side_range_and_size():
  assert transforms.scaled_long_side_range(448) == (256, 512)
  assert transforms.scaled_long_side_range(224) == (128, 256)
  assert transforms.long_side_size(300, 500, 250) == (150, 250)
  assert transforms.long_side_size(500, 300, 250) == (250, 150)


@pytest.mark.parametrize("h,w,size", [(10, 12, 6), (4, 5, 8), (10, 3, 6)])
def test_random_crop_places_content_and_pads(h, w, size):
  rng = np.random.default_rng(1)
  arr = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)
  for _ in range(20):
    box = transforms.random_crop_box(h, w, size, rng)
    out = transforms.apply_crop(arr, box, size, -1)
    assert out.shape == (size, size)
    inside = out[out != -1]
    # The kept values form a contiguous window of the input, unchanged.
    kh, kw = min(h, size), min(w, size)
    assert inside.size == kh * kw
    window = inside.reshape(kh, kw)
    r0, c0 = np.argwhere(arr == window[0, 0])[0]
    np.testing.assert_array_equal(window, arr[r0:r0 + kh, c0:c0 + kw])
    # Padding (-1) only where the input was smaller than the crop.
    assert (out == -1).sum() == size * size - kh * kw


def test_pad_to_multiple():
  x = np.ones((9, 16, 2), np.float32)
  y, pad = transforms.pad_to_multiple(x, 8, 0.0)
  assert y.shape == (16, 16, 2) and pad == (7, 0)
  assert y[9:].sum() == 0 and y[:9].sum() == 9 * 16 * 2


def test_colour_jitter_deterministic_and_identity():
  img = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  a = transforms.colour_jitter(img, np.random.default_rng(5))
  b = transforms.colour_jitter(img, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == img.shape and a.dtype == np.uint8 and not np.array_equal(a, img)
  same = transforms.colour_jitter(img, np.random.default_rng(5), 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_array_equal(same, img)


def test_resize_float_channels_match_single_channel():
  x = np.random.default_rng(3).random((6, 7, 3)).astype(np.float32)
  y = transforms.resize(x, (12, 14), "bilinear")
  assert y.shape == (12, 14, 3)
  np.testing.assert_array_equal(y[..., 1], transforms.resize(x[..., 1], (12, 14), "bilinear"))


def _label_map_direct(la, ha, keys, stride):
  h, w, _ = la.shape
  out = np.zeros((h // stride, w // stride), np.uint8)
  for i in range(h // stride):
    for j in range(w // stride):
      bl = la[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean((0, 1))
      bh = ha[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean((0, 1))
      if bl.max() <= 1e-5:
        v = 255
      elif keys[np.argmax(bh)] == 0:
        v = 0
      elif keys[np.argmax(bl)] == 0:
        v = 255
      else:
        v = keys[np.argmax(bl)]
      out[i, j] = v
  return out


def test_label_map_equals_direct_computation():
  rng = np.random.default_rng(4)
  keys = np.array([0, 3, 15])
  def field():
    # Block-wise distinct distributions plus pixel noise, so every outcome occurs.
    p = np.repeat(np.repeat(rng.dirichlet([0.5] * 3, (4, 5)), 8, 0), 8, 1)
    p = p + 0.2 * rng.random(p.shape)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)
  la, ha = field(), field()
  la[:, 24:] = 0   # Crop padding: no score.
  ha[:, 24:] = 0
  la[20:, :] = 0
  ha[20:, :] = 0   # Rows 16..23 are half padding: still scored.
  got = transforms.label_map_from_crf(la, ha, keys, 8)
  want = _label_map_direct(la, ha, keys, 8)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got)) == {0, 3, 15, 255}
  assert (got[:, 3:] == 255).all()
