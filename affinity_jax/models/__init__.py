"""Flax NNX backbones (ResNet-38, VGG16, EfficientNet-Lite0, tiny) and the three heads."""

from affinity_jax.models.build import BACKBONES, build_backbone
from affinity_jax.models.heads import AffinityNet, CAMNet, SegNet
from affinity_jax.models.layers import FrozenStat

__all__ = ["BACKBONES", "build_backbone", "AffinityNet", "CAMNet", "SegNet", "FrozenStat"]
