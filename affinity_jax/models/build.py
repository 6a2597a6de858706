"""`build_backbone(name, ...)`: the one place that maps backbone names to classes."""

from flax import nnx

from affinity_jax.errors import UserError
from affinity_jax.models.efficientnet_lite import EfficientNetLite0
from affinity_jax.models.resnet38 import ResNet38
from affinity_jax.models.tiny import Tiny
from affinity_jax.models.vgg16 import VGG16

BACKBONES = {"resnet38": ResNet38, "vgg16": VGG16, "lite0": EfficientNetLite0, "tiny": Tiny}


def build_backbone(name: str, *, rngs: nnx.Rngs, norm: str = "frozen", **kw) -> nnx.Module:
  """Builds a stride-8 backbone.

  Args:
    name: `resnet38`, `vgg16`, `lite0` or `tiny`.
    rngs: initialisation (and default dropout) randomness.
    norm: `frozen` (pretrained statistics, not trained), `batch` (trainable
      BatchNorm) or `group` (GroupNorm; the default for `tiny`, which maps
      `frozen` to `group` because it has nothing pretrained). VGG16 ignores it.
    **kw: backbone options (`fc6_dilation` for vgg16; `output_stride`,
      `classifier` for lite0; `width` for tiny).
  """
  if name not in BACKBONES:
    raise UserError(f"backbone: unknown name {name!r}, expected one of {sorted(BACKBONES)}")
  try:
    return BACKBONES[name](rngs=rngs, norm=norm, **kw)
  except TypeError as e:
    raise UserError(f"backbone: bad options {kw} for {name!r} ({e})") from e
