"""VGG16, DeepLab-LargeFOV style (as in the AffinityNet reference), output stride 8.

pool1-3: 3x3 max pools with stride 2 (padding 1); pool4 stride 1; conv5_x with
dilation 2; fc6 directly on conv5_3 (the reference defines pool5 but its
forward pass skips it); fc6 3x3 1024-ch with a
configurable dilation (1 for the classifier, 4 for the affinity variant in the
reference; DeepLab-LargeFOV uses 12); channel dropout 0.5; fc7 1x1 1024-ch.
Inputs are BGR with the Caffe mean subtracted (`normalization = "caffe_bgr"`).
"""

import jax
from flax import nnx

from affinity_jax.models import layers

# (name, in, out, dilation) per conv; a pool follows each group.
_CONVS = (
    (("conv1_1", 3, 64, 1), ("conv1_2", 64, 64, 1)),
    (("conv2_1", 64, 128, 1), ("conv2_2", 128, 128, 1)),
    (("conv3_1", 128, 256, 1), ("conv3_2", 256, 256, 1), ("conv3_3", 256, 256, 1)),
    (("conv4_1", 256, 512, 1), ("conv4_2", 512, 512, 1), ("conv4_3", 512, 512, 1)),
    (("conv5_1", 512, 512, 2), ("conv5_2", 512, 512, 2), ("conv5_3", 512, 512, 2)),
)
CONV_NAMES = tuple(c[0] for group in _CONVS for c in group)


class VGG16(nnx.Module):
  """VGG16-LargeFOV backbone.

  `__call__(x [B,H,W,3], *, train, key=None) -> (features [B,ceil(H/8),ceil(W/8),1024], aux)`
  with aux `low` (conv4_3, 512 ch), `mid` (conv5_3, 512 ch), `high` (= features, fc7).
  """

  out_channels = 1024
  level_channels = (512, 512, 1024)
  frozen_prefixes = ("backbone/conv1_1", "backbone/conv1_2")
  normalization = "caffe_bgr"

  def __init__(self, *, rngs: nnx.Rngs, norm: str = "frozen", fc6_dilation: int = 1):
    del norm  # VGG16 has no normalisation layers.
    for group in _CONVS:
      for name, cin, cout, dil in group:
        setattr(self, name, layers.conv(cin, cout, 3, dilation=dil, bias=True, rngs=rngs))
    self.fc6 = layers.conv(512, 1024, 3, dilation=fc6_dilation, bias=True, rngs=rngs)
    self.drop6 = layers.channel_dropout(0.5, rngs)
    self.fc7 = layers.conv(1024, 1024, 1, bias=True, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    aux = {}
    for g, group in enumerate(_CONVS):
      for name, *_ in group:
        x = jax.nn.relu(getattr(self, name)(x))
      if g < 3:
        x = layers.max_pool(x, 3, 2, 1)
      elif g == 3:
        aux["low"] = x
        x = layers.max_pool(x, 3, 1, 1)
      else:
        aux["mid"] = x
    x = jax.nn.relu(self.fc6(x))
    x = layers.dropout(self.drop6, x, train=train, key=key)
    x = jax.nn.relu(self.fc7(x))
    aux["high"] = x
    return x, aux
