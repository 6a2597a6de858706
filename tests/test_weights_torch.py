"""Where torch is installed: our modules match small torch modules on the same weights,
our reader reads files torch wrote, and torch reads files our writer wrote."""

import numpy as np
import pytest
from flax import nnx

from affinity_jax.models import resnet38, vgg16
from affinity_jax.weights import load, mappings, pytorch
from affinity_jax.weights.load import load_pretrained

import torch_or_skip
import weight_files

torch = torch_or_skip.import_torch()
F = torch.nn.functional


def _bn(c):
  bn = torch.nn.BatchNorm2d(c)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
  return bn


class TorchBlock(torch.nn.Module):
  """The reference layout of a pre-activation basic block, written for this test."""

  def __init__(self, cin, cmid, cout, stride=1, first_dilation=None, dilation=1):
    super().__init__()
    fd = dilation if first_dilation is None else first_dilation
    self.same = cin == cout and stride == 1
    self.bn_branch2a = _bn(cin)
    self.conv_branch2a = torch.nn.Conv2d(cin, cmid, 3, stride, fd, fd, bias=False)
    self.bn_branch2b1 = _bn(cmid)
    self.conv_branch2b1 = torch.nn.Conv2d(cmid, cout, 3, 1, dilation, dilation, bias=False)
    if not self.same:
      self.conv_branch1 = torch.nn.Conv2d(cin, cout, 1, stride, bias=False)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    b1 = x if self.same else self.conv_branch1(a)
    y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    return b1 + y


class TorchBot(torch.nn.Module):
  def __init__(self, cin, cout, dilation):
    super().__init__()
    self.bn_branch2a = _bn(cin)
    self.conv_branch2a = torch.nn.Conv2d(cin, cout // 4, 1, bias=False)
    self.bn_branch2b1 = _bn(cout // 4)
    self.conv_branch2b1 = torch.nn.Conv2d(cout // 4, cout // 2, 3, 1, dilation, dilation, bias=False)
    self.bn_branch2b2 = _bn(cout // 2)
    self.conv_branch2b2 = torch.nn.Conv2d(cout // 2, cout, 1, bias=False)
    self.conv_branch1 = torch.nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    a = F.relu(self.bn_branch2a(x))
    y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
    y = self.conv_branch2b2(F.relu(self.bn_branch2b2(y)))
    return self.conv_branch1(a) + y


class TorchMini(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.b4 = TorchBlock(4, 8, 8, stride=2)
    self.b4_1 = TorchBlock(8, 8, 8)
    self.b5 = TorchBlock(8, 8, 16, first_dilation=1, dilation=2)
    self.b6 = TorchBot(16, 32, 4)

  def forward(self, x):
    return self.b6(self.b5(self.b4_1(self.b4(x))))


class Mini(nnx.Module):
  def __init__(self, rngs):
    kw = {"rngs": rngs, "norm": "frozen"}
    self.b4 = resnet38.ResBlock(4, 8, 8, stride=2, **kw)
    self.b4_1 = resnet38.ResBlock(8, 8, 8, **kw)
    self.b5 = resnet38.ResBlock(8, 8, 16, first_dilation=1, dilation=2, **kw)
    self.b6 = resnet38.ResBlockBot(16, 32, dilation=4, **kw)

  def __call__(self, x):
    for block in (self.b4, self.b4_1, self.b5, self.b6):
      x, _ = block(x, train=False)
    return x


def _nchw(x):
  return torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())


@pytest.mark.parametrize("legacy", [False, True])
def test_resnet38_blocks_match_torch(tmp_path, legacy):
  torch.manual_seed(0)
  ref = TorchMini().eval()
  path = str(tmp_path / "mini.pth")
  torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  source = pytorch.load_state_dict(path)
  entries = [e for e in mappings.resnet38_torch() if e[0].split(".")[0] in ("b4", "b4_1", "b5", "b6")]
  arrays, unused = load.apply_table(source, entries)
  assert unused == []
  ours = weight_files.nan_model(lambda: Mini(nnx.Rngs(0)))
  loaded, missing = load.assign_arrays(ours, arrays, path)
  counters = [k for k in source if k.endswith("num_batches_tracked")]
  assert missing == [] and len(counters) == 9 and len(loaded) == len(source) - 9
  x = np.random.default_rng(0).normal(size=(2, 13, 18, 4)).astype(np.float32)
  with torch.no_grad():
    want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  got = nnx.jit(lambda m, x: m(x))(ours, x)   # One compile, not one per op.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


class TorchVGG(torch.nn.Module):
  """DeepLab-LargeFOV VGG16 in the reference's layout, written for this test."""

  def __init__(self, fc6_dilation):
    super().__init__()
    for name, cin, cout, dil in (c for g in vgg16._CONVS for c in g):
      setattr(self, name, torch.nn.Conv2d(cin, cout, 3, padding=dil, dilation=dil))
    self.fc6 = torch.nn.Conv2d(512, 1024, 3, padding=fc6_dilation, dilation=fc6_dilation)
    self.fc7 = torch.nn.Conv2d(1024, 1024, 1)

  def forward(self, x):
    for g, group in enumerate(vgg16._CONVS):
      for name, *_ in group:
        x = F.relu(getattr(self, name)(x))
      if g < 3:
        x = F.max_pool2d(x, 3, 2, 1)
      elif g == 3:
        x = F.max_pool2d(x, 3, 1, 1)
    return F.relu(self.fc7(F.relu(self.fc6(x))))


def test_vgg16_matches_torch(tmp_path):
  torch.manual_seed(1)
  ref = TorchVGG(4).eval()
  path = str(tmp_path / "vgg.pth")
  torch.save(ref.state_dict(), path)
  ours = weight_files.nan_model(lambda: vgg16.VGG16(rngs=nnx.Rngs(0), fc6_dilation=4))
  report = load_pretrained(ours, path, verbose=False)
  assert report.kept == [] and report.unused == []
  x = np.random.default_rng(1).normal(size=(1, 21, 30, 3)).astype(np.float32) * 50
  with torch.no_grad():
    want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  got, _ = ours(x, train=False)
  assert got.shape == want.shape == (1, 3, 4, 1024)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_reads_our_files(tmp_path, legacy):
  rng = np.random.default_rng(2)
  sd = {"a.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
        "a.bias": rng.normal(size=(3,)).astype(np.float16),
        "n": np.array(4, np.int64)}
  path = str(tmp_path / "ours.pth")
  weight_files.save_state_dict(path, sd, legacy=legacy)
  got = torch.load(path, weights_only=True)
  assert list(got) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k].numpy(), v)


def test_reader_handles_views_and_non_contiguous_tensors(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = {"t": base.t(), "slice": base[1:3, 2:], "shared": base}
  path = str(tmp_path / "views.pth")
  torch.save(sd, path)
  got = pytorch.load_state_dict(path)
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v.numpy())
