"""psa's networks and its `infer_cls.py` / `infer_aff.py`, transcribed in torch for the tests.

The reference networks (`network/resnet38d.py`, `resnet38_cls.py`, `resnet38_aff.py`,
`vgg16d.py`, `vgg16_cls.py`) are written out again here, not copied; the layout follows
the reference's module names, so a state dict of theirs is one of ours. `infer_cls` and
`infer_aff` do what psa's two inference scripts do for one image, from the same published
description (the spec): the 8-pass CAM merge and the dense random walk, T squared 8 times.
Importing this module skips the importing test where torch is missing
(`torch_or_skip`).
"""

import numpy as np
from PIL import Image

import torch_or_skip

torch = torch_or_skip.import_torch()
nn = torch.nn
F = torch.nn.functional

RADIUS = 5  # The reference's pair radius (resnet38_aff.Net).


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




# ---------------------------------------------------------------- psa's inference scripts

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image):
  """psa's `Normalize` of ResNet-38: (RGB / 255 - mean) / std, float32 [H, W, 3]."""
  return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (2, 0, 1))[None]))


def infer_cls(model, image, labels, scales=(1.0, 0.5, 1.5, 2.0)):
  """`infer_cls.py` for one image: {class index: float32 [H, W] CAM} of present classes.

  Each scale: PIL bicubic resize of the image (no padding), normalised, forward_cam of
  the image and of its mirror; each CAM bilinearly resized to H x W (align_corners
  False), multiplied by the image label, the mirror's flipped back; the 8 summed; each
  class divided by its max + 1e-5.
  """
  h, w = image.shape[:2]
  label = np.asarray(labels, np.float32)
  total = np.zeros((20, h, w), np.float32)
  with torch.no_grad():
    for s in scales:
      size = (round(w * s), round(h * s))
      x = normalize(np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)))
      for flip in (False, True):
        inp = _nchw(x[:, ::-1] if flip else x)
        cam = F.interpolate(model.forward_cam(inp), (h, w), mode="bilinear",
                            align_corners=False)[0].numpy() * label[:, None, None]
        total += cam[..., ::-1] if flip else cam
  norm = total / (total.max(axis=(1, 2), keepdims=True) + 1e-5)
  return {i: norm[i] for i in range(20) if label[i] > 1e-5}


def dense_affinity(model, x):
  """`resnet38_aff.Net.forward(x, to_dense=True)`: the N x N affinity matrix of the
  reference's pairs, both directions, plus the identity."""
  emb, aff = model(x)
  h, w = emb.shape[2:]
  src, dst = reference_pairs(RADIUS, h, w)
  n = h * w
  mat = torch.zeros(n, n, dtype=torch.float64)
  src_all = torch.from_numpy(np.tile(src, len(dst) // len(src)))
  dst = torch.from_numpy(dst)
  values = aff[0].reshape(-1).double()
  mat[src_all, dst] = values
  mat[dst, src_all] = values
  mat[torch.arange(n), torch.arange(n)] = 1.0
  return mat.float()


def infer_aff(model, image, cam_dict, alpha=16.0, beta=8.0, logt=8):
  """`infer_aff.py` for one image: uint8 [H, W] random-walk label.

  The image is normalised and zero-padded to a multiple of 8; the CAMs of cam_dict go to
  channels k + 1 of 21, channel 0 = (1 - max)^alpha, zero-padded likewise and 8 x 8
  average-pooled; T = A^beta divided by its column sums, squared `logt` times; the walked
  scores upsampled bilinearly (align_corners False) to the padded size, argmax, cropped.
  """
  h, w = image.shape[:2]
  hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
  x = np.pad(normalize(image), ((0, hp - h), (0, wp - w), (0, 0)))
  full = np.zeros((21, h, w), np.float32)
  for k, v in cam_dict.items():
    full[k + 1] = v
  full[0] = (1 - np.max(full[1:], axis=0)) ** alpha
  full = np.pad(full, ((0, 0), (0, hp - h), (0, wp - w)))
  with torch.no_grad():
    aff = dense_affinity(model, _nchw(x)) ** beta
    trans = aff / torch.sum(aff, dim=0, keepdim=True)
    for _ in range(logt):
      trans = trans @ trans
    vec = F.avg_pool2d(torch.from_numpy(full)[None], 8, 8).reshape(21, -1)
    walked = (vec @ trans).reshape(1, 21, hp // 8, wp // 8)
    walked = F.interpolate(walked, (hp, wp), mode="bilinear", align_corners=False)
  return np.uint8(torch.argmax(walked[0], dim=0).numpy())[:h, :w]
