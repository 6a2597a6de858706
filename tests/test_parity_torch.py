"""Whole networks against the reference's: our ResNet-38 CAMNet and AffinityNet against a
torch transcription of psa's `network/resnet38_cls.Net` and `network/resnet38_aff.Net`
(on `resnet38d.Net`), and our VGG16 CAMNet against `vgg16_cls.Net` (on `vgg16d.Net`), on
the same random weights. (psa's `vgg16_aff.Net` puts GroupNorm after f8_3/f8_4/f8_5; our
AffinityNet has none on any backbone, so it is not compared.)

The reference networks are written out here for the test (not copied; the layout follows
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

import torch_or_skip
import weight_files

torch = torch_or_skip.import_torch()
nn = torch.nn
F = torch.nn.functional

RADIUS = 5  # The reference's pair radius (resnet38_aff.Net).


# ---------------------------------------------------------------- the reference, in torch

class RefBlock(nn.Module):
  """resnet38d.ResBlock: pre-activation, two 3x3 convs, 1x1 projection on a shape change."""

  def __init__(self, cin, cmid, cout, stride=1, first_dilation=None, dilation=1):
    super().__init__()
    d1 = dilation if first_dilation is None else first_dilation
    self.same_shape = cin == cout and stride == 1
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, cmid, 3, stride, padding=d1, dilation=d1, bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(cmid)
    self.conv_branch2b1 = nn.Conv2d(cmid, cout, 3, padding=dilation, dilation=dilation,
                                    bias=False)
    if not self.same_shape:
      self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

  def forward(self, x):
    """(output, relu(bn(x)))."""
    pre = F.relu(self.bn_branch2a(x))
    shortcut = x if self.same_shape else self.conv_branch1(pre)
    y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(pre))))
    return shortcut + y, pre


class RefBottleneck(nn.Module):
  """resnet38d.ResBlock_bot: pre-activation 1x1 -> 3x3 dilated -> 1x1, channel dropout."""

  def __init__(self, cin, cout, dilation, dropout):
    super().__init__()
    self.bn_branch2a = nn.BatchNorm2d(cin)
    self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
    self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
    self.dropout_2b1 = nn.Dropout2d(dropout)
    self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation,
                                    dilation=dilation, bias=False)
    self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
    self.dropout_2b2 = nn.Dropout2d(dropout)
    self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
    self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    pre = F.relu(self.bn_branch2a(x))
    y = self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(pre))))
    y = self.dropout_2b2(F.relu(self.bn_branch2b2(self.conv_branch2b1(y))))
    return self.conv_branch1(pre) + self.conv_branch2b2(y), pre


class RefResNet38(nn.Module):
  """resnet38d.Net: conv1a, stages b2..b5 of basic blocks, bottlenecks b6, b7, bn7."""

  def __init__(self):
    super().__init__()
    self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    self.stages = []
    for stage, cin, cmid, cout, n in ((2, 64, 128, 128, 3), (3, 128, 256, 256, 3),
                                      (4, 256, 512, 512, 6), (5, 512, 512, 1024, 3)):
      for i in range(n):
        name = f"b{stage}" if i == 0 else f"b{stage}_{i}"
        if stage == 5:  # Output stride 8 from here on: dilation instead of stride.
          block = RefBlock(cin if i == 0 else cout, cmid, cout, 1,
                           first_dilation=1 if i == 0 else None, dilation=2)
        else:
          block = RefBlock(cin if i == 0 else cout, cmid, cout, 2 if i == 0 else 1)
        setattr(self, name, block)
        self.stages.append(name)
    self.b6 = RefBottleneck(1024, 2048, dilation=4, dropout=0.3)
    self.b7 = RefBottleneck(2048, 4096, dilation=4, dropout=0.5)
    self.bn7 = nn.BatchNorm2d(4096)

  def forward_as_dict(self, x):
    x = self.conv1a(x)
    for name in self.stages:
      x, pre = getattr(self, name)(x)
      if name == "b5":
        conv4 = pre
    x, conv5 = self.b6(x)
    x, _ = self.b7(x)
    return {"conv4": conv4, "conv5": conv5, "conv6": F.relu(self.bn7(x))}


class RefCAM(RefResNet38):
  """resnet38_cls.Net: dropout7 -> global average pool -> fc8 (logits); CAMs relu(fc8 * f)."""

  def __init__(self):
    super().__init__()
    self.dropout7 = nn.Dropout2d(0.5)
    self.fc8 = nn.Conv2d(4096, 20, 1, bias=False)

  def forward(self, x):
    f = self.dropout7(self.forward_as_dict(x)["conv6"])
    return self.fc8(F.adaptive_avg_pool2d(f, 1)).flatten(1)

  def forward_cam(self, x):
    return F.relu(F.conv2d(self.forward_as_dict(x)["conv6"], self.fc8.weight))

  def forward_both(self, x):
    """(forward(x), forward_cam(x)) from one pass of the backbone, for the test's time."""
    f = self.forward_as_dict(x)["conv6"]
    logits = self.fc8(F.adaptive_avg_pool2d(self.dropout7(f), 1)).flatten(1)
    return logits, F.relu(F.conv2d(f, self.fc8.weight))


def reference_pairs(radius, height, width):
  """psa's pair indices (tool/pyutils.get_indices_of_pairs), written out again.

  Offsets: (0, 1..r-1), then rows 1..r-1 with dx in -(r-1)..r-1 inside the disk.
  Sources: the pixels of rows 0..H-r and columns r-1..W-r, row-major (every offset
  lands inside). Returns (sources [L], targets [K*L], offset-major) as flat indices.
  """
  m = radius - 1
  offsets = [(0, dx) for dx in range(1, radius)]
  offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-m, radius)
              if dy * dy + dx * dx < radius * radius]
  ys, xs = np.meshgrid(np.arange(height - m), np.arange(m, width - m), indexing="ij")
  src = (ys * width + xs).reshape(-1)
  dst = np.concatenate([((ys + dy) * width + xs + dx).reshape(-1) for dy, dx in offsets])
  return src, dst


class RefAff(RefResNet38):
  """resnet38_aff.Net: f8_3/f8_4/f8_5 (1x1, ELU) on conv4/conv5/conv6 -> concat -> f9 + ELU;
  affinity exp(-mean_c |f_i - f_j|) over the reference's pairs.

  forward returns (embedding [B,448,h,w], affinities [B,K,L]) where the reference returns
  the affinities only.
  """

  def __init__(self):
    super().__init__()
    self.f8_3 = nn.Conv2d(512, 64, 1, bias=False)
    self.f8_4 = nn.Conv2d(1024, 128, 1, bias=False)
    self.f8_5 = nn.Conv2d(4096, 256, 1, bias=False)
    self.f9 = nn.Conv2d(448, 448, 1, bias=False)

  def forward(self, x):
    d = self.forward_as_dict(x)
    levels = [F.elu(self.f8_3(d["conv4"])), F.elu(self.f8_4(d["conv5"])),
              F.elu(self.f8_5(d["conv6"]))]
    emb = F.elu(self.f9(torch.cat(levels, dim=1)))
    b, c, h, w = emb.shape
    src, dst = (torch.from_numpy(i) for i in reference_pairs(RADIUS, h, w))
    flat = emb.reshape(b, c, h * w)
    f_src = flat.index_select(2, src)[:, :, None, :]            # [B, C, 1, L]
    f_dst = flat.index_select(2, dst).reshape(b, c, -1, len(src))  # [B, C, K, L]
    return emb, torch.exp(-(f_dst - f_src).abs().mean(dim=1))


class RefVGG16(nn.Module):
  """vgg16d.Net: DeepLab-LargeFOV VGG16; 3x3 max pools (stride 2, 2, 2, then 1), conv5 at
  dilation 2, fc6 at `fc6_dilation`, drop6, fc7. pool5 is defined there but not used."""

  GROUPS = ((("conv1_1", 3, 64), ("conv1_2", 64, 64)),
            (("conv2_1", 64, 128), ("conv2_2", 128, 128)),
            (("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)),
            (("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)),
            (("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)))

  def __init__(self, fc6_dilation=1):
    super().__init__()
    for g, group in enumerate(self.GROUPS):
      d = 2 if g == 4 else 1
      for name, cin, cout in group:
        setattr(self, name, nn.Conv2d(cin, cout, 3, padding=d, dilation=d))
    self.fc6 = nn.Conv2d(512, 1024, 3, padding=fc6_dilation, dilation=fc6_dilation)
    self.drop6 = nn.Dropout2d(0.5)
    self.fc7 = nn.Conv2d(1024, 1024, 1)

  def forward(self, x):
    for g, group in enumerate(self.GROUPS):
      for name, _, _ in group:
        x = F.relu(getattr(self, name)(x))
      if g < 4:
        x = F.max_pool2d(x, 3, stride=2 if g < 3 else 1, padding=1)
    return F.relu(self.fc7(self.drop6(F.relu(self.fc6(x)))))


class RefVGGCAM(RefVGG16):
  """vgg16_cls.Net: drop7 -> fc8 (1x1, no bias) -> global average pool; CAMs sqrt(relu(fc8 * f))."""

  def __init__(self):
    super().__init__(fc6_dilation=1)
    self.drop7 = nn.Dropout2d(0.5)
    self.fc8 = nn.Conv2d(1024, 20, 1, bias=False)

  def forward(self, x):
    x = self.fc8(self.drop7(super().forward(x)))
    return F.adaptive_avg_pool2d(x, 1).flatten(1)

  def forward_cam(self, x):
    return torch.sqrt(F.relu(self.fc8(super().forward(x))))


def randomize(module, seed, gain=1.0):
  """Random weights and statistics in every Conv2d and BatchNorm2d.

  Convs ~ N(0, gain/fan_in) keep the activations' scale roughly level (gain 1 through
  residual blocks, 2 through VGG's plain ReLU stack); BatchNorm gets affine terms and running statistics away from 1 and 0, so a wrong
  mapping (e.g. scale <-> var) shows.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (gain / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
  return module.eval()


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
