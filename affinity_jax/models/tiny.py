"""A small randomly initialised stride-8 CNN for tests and fast CPU training from scratch.

Three stride-2 stem convs (16, 32, 32 ch) reach stride 8; then three residual
stages at stride 8 give the three levels (32, 64, 128 ch; dilations 1, 2, 4 for
a receptive field that covers a 96-128 px scene). Normalisation is GroupNorm
by default: it does not depend on the batch, so it trains from scratch with
small per-device batches and behaves the same in training and inference.
"""

import jax
from flax import nnx

from affinity_jax.models import layers


class ConvNorm(nnx.Module):
  """conv -> norm -> relu."""

  def __init__(self, cin, cout, *, rngs, norm, stride=1, dilation=1):
    self.conv = layers.conv(cin, cout, 3, stride=stride, dilation=dilation, rngs=rngs)
    self.norm = layers.make_norm(norm, cout, rngs=rngs)

  def __call__(self, x, *, train):
    return jax.nn.relu(self.norm(self.conv(x), train=train))


class Stage(nnx.Module):
  """Channel change then a residual pair of dilated 3x3 convs."""

  def __init__(self, cin, cout, dilation, *, rngs, norm):
    self.entry = ConvNorm(cin, cout, rngs=rngs, norm=norm, dilation=dilation)
    self.res_a = ConvNorm(cout, cout, rngs=rngs, norm=norm, dilation=dilation)
    self.res_b = ConvNorm(cout, cout, rngs=rngs, norm=norm, dilation=dilation)

  def __call__(self, x, *, train):
    x = self.entry(x, train=train)
    return x + self.res_b(self.res_a(x, train=train), train=train)


class Tiny(nnx.Module):
  """Tiny backbone.

  `__call__(x [B,H,W,3], *, train, key=None) -> (features [B,ceil(H/8),ceil(W/8),128], aux)`
  with aux `low` (32 ch), `mid` (64 ch), `high` (= features, 128 ch).
  """

  level_channels = (32, 64, 128)
  out_channels = 128
  frozen_prefixes = ()
  normalization = "imagenet_rgb"

  def __init__(self, *, rngs: nnx.Rngs, norm: str = "group", width: int = 32):
    if norm == "frozen":
      norm = "group"  # Nothing pretrained to freeze: train from scratch.
    c1, c2, c3 = width, 2 * width, 4 * width
    self.level_channels = (c1, c2, c3)
    self.out_channels = c3
    self.stem1 = ConvNorm(3, c1 // 2, rngs=rngs, norm=norm, stride=2)
    self.stem2 = ConvNorm(c1 // 2, c1, rngs=rngs, norm=norm, stride=2)
    self.stem3 = ConvNorm(c1, c1, rngs=rngs, norm=norm, stride=2)
    self.stage1 = Stage(c1, c1, 1, rngs=rngs, norm=norm)
    self.stage2 = Stage(c1, c2, 2, rngs=rngs, norm=norm)
    self.stage3 = Stage(c2, c3, 4, rngs=rngs, norm=norm)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    del key
    x = self.stem3(self.stem2(self.stem1(x, train=train), train=train), train=train)
    low = self.stage1(x, train=train)
    mid = self.stage2(low, train=train)
    high = self.stage3(mid, train=train)
    return high, {"low": low, "mid": mid, "high": high}
