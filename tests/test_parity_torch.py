"""Whole networks against the reference's: our ResNet-38 CAMNet and AffinityNet against a
torch transcription of psa's `network/resnet38_cls.Net` and `network/resnet38_aff.Net`
(on `resnet38d.Net`), and our VGG16 CAMNet against `vgg16_cls.Net` (on `vgg16d.Net`), on
the same random weights. (psa's `vgg16_aff.Net` puts GroupNorm after f8_3/f8_4/f8_5; our
AffinityNet has none on any backbone, so it is not compared.)

The reference networks are written out in `psa_torch.py` (not copied; the layout follows
the reference's module names, so a state dict of theirs is one of ours). torch writes
the weights to a .pth that our own reader and `load_pretrained` load, so the file path
is checked too. Eval mode (dropout off, BatchNorm on its running statistics).
Tolerance: outputs agree to 1e-4 of their largest magnitude (plus rtol 1e-4); the
affinities, in (0, 1], to 1e-4 absolute. Both sides compute in float32 through ~40
layers, summing in different orders (XLA's and oneDNN's convolutions): the errors seen
are 1-2e-6 of the scale (affinities 2e-7), so the bound leaves ~50x for other CPUs and
library versions. A wrong padding, dilation, stride or activation gives errors far above
the bound (symmetric padding replaced by SAME: 1.9 on CAMs of scale 4.4).
"""

import numpy as np
import pytest
from flax import nnx

from affinity_jax.models import AffinityNet, CAMNet
from affinity_jax.ops import affinity, neighbors
from affinity_jax.weights.load import load_pretrained

import weight_files
from psa_torch import RADIUS, RefAff, RefCAM, RefResNet38, RefVGGCAM, randomize, torch


# ---------------------------------------------------------------- helpers

def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _close(got, want, what):
  """|got - want| <= 1e-4 * |want| + 1e-4 * max|want|, elementwise."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = float(np.abs(want).max())
  assert scale > 0, what
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def _forward(model, x):
  return nnx.jit(lambda m, x: m(x, train=False))(model, x)


# Two images of an odd size: 61 x 83 -> 31 x 42 -> 16 x 21 -> 8 x 11, so the stride-2
# convs meet both odd and even sizes (symmetric padding, ceil(H / 2) rows, as torch), and
# the 8 x 11 map leaves the reference's pair region (4 x 3 sources) non-empty.
IMAGES = np.random.default_rng(0).normal(size=(2, 61, 83, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_backbone():
  torch.manual_seed(0)
  return randomize(RefResNet38(), seed=0).state_dict()


# ---------------------------------------------------------------- ResNet-38

def test_resnet38_cam_net_matches_reference(tmp_path, torch_backbone):
  ref = RefCAM()
  keys = ref.load_state_dict(torch_backbone, strict=False)
  assert keys.missing_keys == ["fc8.weight"] and keys.unexpected_keys == []
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    ref.fc8.weight.copy_(torch.randn(ref.fc8.weight.shape, generator=g) * 0.05)
  ref.eval()
  path = str(tmp_path / "res38_cls.pth")
  torch.save(ref.state_dict(), path)
  x = _nchw(IMAGES)
  with torch.no_grad():
    want_logits, want_cams = ref.forward_both(x)
  want_logits, want_cams = want_logits.numpy(), _nhwc(want_cams)

  ours = weight_files.nan_model(lambda: CAMNet("resnet38", rngs=nnx.Rngs(0)))
  report = load_pretrained(ours, path, verbose=False)
  assert report.kept == [] and report.unused == []
  assert "classifier/kernel" in report.loaded
  logits, aux = _forward(ours, IMAGES)
  assert want_cams.shape == (2, 8, 11, 20)
  _close(aux["cams"], want_cams, "CAMs")
  _close(logits, want_logits, "logits")


def test_resnet38_affinity_net_matches_reference(tmp_path, torch_backbone):
  ref = RefAff()
  keys = ref.load_state_dict(torch_backbone, strict=False)
  assert sorted(keys.missing_keys) == [f"{n}.weight" for n in ("f8_3", "f8_4", "f8_5", "f9")]
  assert keys.unexpected_keys == []
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for conv in (ref.f8_3, ref.f8_4, ref.f8_5, ref.f9):
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
  ref.eval()
  path = str(tmp_path / "res38_aff.pth")
  torch.save(ref.state_dict(), path)
  x = _nchw(IMAGES)
  with torch.no_grad():
    want_emb, want_aff = ref(x)
  want_emb, want_aff = _nhwc(want_emb), want_aff.numpy()

  ours = weight_files.nan_model(lambda: AffinityNet("resnet38", rngs=nnx.Rngs(0)))
  report = load_pretrained(ours, path, verbose=False)
  assert report.kept == [] and report.unused == []
  assert {"f8_3/kernel", "f9/kernel"} <= set(report.loaded)
  emb, _ = _forward(ours, IMAGES)
  _close(emb, want_emb, "embedding")

  offsets = neighbors.half_disk_offsets(RADIUS)
  aff = np.asarray(affinity.pairwise_affinity(emb, offsets))   # [B, K, H, W]
  m = RADIUS - 1
  h, w = emb.shape[1:3]
  aff = aff[:, :, :h - m, m:w - m].reshape(2, len(offsets), -1)
  assert want_aff.shape == aff.shape == (2, 34, 4 * 3)
  # Not a constant (all 0 or all 1), so that the comparison means something.
  assert 0.05 < want_aff.min() and want_aff.max() - want_aff.min() > 0.1
  np.testing.assert_allclose(aff, want_aff, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- VGG16

def test_vgg16_cam_net_matches_reference(tmp_path):
  ref = randomize(RefVGGCAM(), seed=3, gain=2.0)
  path = str(tmp_path / "vgg_cls.pth")
  torch.save(ref.state_dict(), path)
  images = IMAGES * 50   # Caffe-style inputs: BGR minus the mean, in 0..255 units.
  x = _nchw(images)
  with torch.no_grad():
    want_logits = ref(x).numpy()
    want_cams = _nhwc(ref.forward_cam(x))

  ours = weight_files.nan_model(lambda: CAMNet("vgg16", rngs=nnx.Rngs(0)))
  report = load_pretrained(ours, path, verbose=False)
  assert report.kept == [] and report.unused == []
  logits, aux = _forward(ours, images)
  assert want_cams.shape == (2, 8, 11, 20)
  assert (want_cams > 0).mean() > 0.2   # The square root acts on something.
  # Near 0 the root turns a rounding error e into up to sqrt(e) (2e-5 of the scale seen
  # here), so the CAMs are compared squared, i.e. relu(fc8 . f) before the root, at the
  # usual tolerance, and as they are at 1e-3 of their scale.
  cams = np.asarray(aux["cams"])
  _close(cams ** 2, want_cams ** 2, "CAMs squared")
  np.testing.assert_allclose(cams, want_cams, rtol=0, atol=1e-3 * want_cams.max())
  _close(logits, want_logits, "logits")
