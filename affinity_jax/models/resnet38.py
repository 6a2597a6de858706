"""ResNet-38 "model A1" (Wu et al., wide ResNet; as used by AffinityNet), output stride 8.

Pre-activation residual blocks. Submodule names mirror the reference PyTorch
port (conv1a, b2, b2_1, ..., b7, bn7; inside a block bn_branch2a,
conv_branch2a, ...), so the weight mapping in `affinity_jax.weights.mappings`
reads as a table. b5 uses dilation 2, the bottleneck blocks b6/b7 dilation 4
with channel dropout 0.3 / 0.5.
"""

import jax
from flax import nnx

from affinity_jax.models import layers


class ResBlock(nnx.Module):
  """Pre-activation basic block: two 3x3 convs, 1x1 projection when the shape changes."""

  def __init__(self, cin: int, cmid: int, cout: int, *, rngs: nnx.Rngs, norm: str, stride: int = 1,
               first_dilation: int | None = None, dilation: int = 1):
    first_dilation = dilation if first_dilation is None else first_dilation
    self.same_shape = cin == cout and stride == 1
    self.bn_branch2a = layers.make_norm(norm, cin, rngs=rngs)
    self.conv_branch2a = layers.conv(cin, cmid, 3, stride=stride, dilation=first_dilation, rngs=rngs)
    self.bn_branch2b1 = layers.make_norm(norm, cmid, rngs=rngs)
    self.conv_branch2b1 = layers.conv(cmid, cout, 3, dilation=dilation, rngs=rngs)
    self.conv_branch1 = None if self.same_shape else layers.conv(cin, cout, 1, stride=stride, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key=None) -> tuple[jax.Array, jax.Array]:
    """Returns (block output, relu(bn(x)) the pre-activated input)."""
    del key
    a = jax.nn.relu(self.bn_branch2a(x, train=train))
    branch1 = x if self.conv_branch1 is None else self.conv_branch1(a)
    y = self.conv_branch2a(a)
    y = jax.nn.relu(self.bn_branch2b1(y, train=train))
    y = self.conv_branch2b1(y)
    return branch1 + y, a


class ResBlockBot(nnx.Module):
  """Pre-activation bottleneck block 1x1 -> 3x3 (dilated) -> 1x1 with channel dropout."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, norm: str, stride: int = 1,
               dilation: int = 1, dropout: float = 0.0):
    self.bn_branch2a = layers.make_norm(norm, cin, rngs=rngs)
    self.conv_branch2a = layers.conv(cin, cout // 4, 1, stride=stride, rngs=rngs)
    self.bn_branch2b1 = layers.make_norm(norm, cout // 4, rngs=rngs)
    self.dropout_2b1 = layers.channel_dropout(dropout, rngs)
    self.conv_branch2b1 = layers.conv(cout // 4, cout // 2, 3, dilation=dilation, rngs=rngs)
    self.bn_branch2b2 = layers.make_norm(norm, cout // 2, rngs=rngs)
    self.dropout_2b2 = layers.channel_dropout(dropout, rngs)
    self.conv_branch2b2 = layers.conv(cout // 2, cout, 1, rngs=rngs)
    self.conv_branch1 = layers.conv(cin, cout, 1, stride=stride, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key=None) -> tuple[jax.Array, jax.Array]:
    k1, k2 = layers.split_key(key, 2)
    a = jax.nn.relu(self.bn_branch2a(x, train=train))
    branch1 = self.conv_branch1(a)
    y = self.conv_branch2a(a)
    y = jax.nn.relu(self.bn_branch2b1(y, train=train))
    y = layers.dropout(self.dropout_2b1, y, train=train, key=k1)
    y = self.conv_branch2b1(y)
    y = jax.nn.relu(self.bn_branch2b2(y, train=train))
    y = layers.dropout(self.dropout_2b2, y, train=train, key=k2)
    y = self.conv_branch2b2(y)
    return branch1 + y, a


# (name, kind, args): the reference layout, in forward order.
_BLOCKS = (
    ("b2", 64, 128, 128, 2, None, 1), ("b2_1", 128, 128, 128, 1, None, 1),
    ("b2_2", 128, 128, 128, 1, None, 1),
    ("b3", 128, 256, 256, 2, None, 1), ("b3_1", 256, 256, 256, 1, None, 1),
    ("b3_2", 256, 256, 256, 1, None, 1),
    ("b4", 256, 512, 512, 2, None, 1),
    *((f"b4_{i}", 512, 512, 512, 1, None, 1) for i in range(1, 6)),
    ("b5", 512, 512, 1024, 1, 1, 2), ("b5_1", 1024, 512, 1024, 1, None, 2),
    ("b5_2", 1024, 512, 1024, 1, None, 2),
)
BLOCK_NAMES = tuple(b[0] for b in _BLOCKS) + ("b6", "b7")


class ResNet38(nnx.Module):
  """ResNet-38 backbone.

  `__call__(x [B,H,W,3], *, train, key=None) -> (features [B,ceil(H/8),ceil(W/8),4096], aux)`
  with aux `low` (512-ch pre-activated input of b5), `mid` (1024-ch pre-activated
  input of b6) and `high` (= features, relu(bn7(b7))).
  """

  out_channels = 4096
  level_channels = (512, 1024, 4096)
  frozen_prefixes = ("backbone/conv1a", "backbone/b2", "backbone/b2_1", "backbone/b2_2")
  normalization = "imagenet_rgb"

  def __init__(self, *, rngs: nnx.Rngs, norm: str = "frozen"):
    self.conv1a = layers.conv(3, 64, 3, rngs=rngs)
    for name, cin, cmid, cout, stride, first_dil, dil in _BLOCKS:
      setattr(self, name, ResBlock(cin, cmid, cout, rngs=rngs, norm=norm, stride=stride,
                                   first_dilation=first_dil, dilation=dil))
    self.b6 = ResBlockBot(1024, 2048, rngs=rngs, norm=norm, dilation=4, dropout=0.3)
    self.b7 = ResBlockBot(2048, 4096, rngs=rngs, norm=norm, dilation=4, dropout=0.5)
    self.bn7 = layers.make_norm(norm, 4096, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    k6, k7 = layers.split_key(key, 2)
    x = self.conv1a(x)
    aux = {}
    for name, *_ in _BLOCKS:
      x, pre = getattr(self, name)(x, train=train)
      if name == "b5":
        aux["low"] = pre
    x, aux["mid"] = self.b6(x, train=train, key=k6)
    x, _ = self.b7(x, train=train, key=k7)
    x = jax.nn.relu(self.bn7(x, train=train))
    aux["high"] = x
    return x, aux
