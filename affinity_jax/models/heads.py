"""The three networks of the pipeline, each a backbone (attribute `backbone`) plus a head.

Everything under `backbone/` is pretrained (or the early stages frozen by
`backbone.frozen_prefixes`), everything else is new. Dropout is active only with
`train=True`; pass `key=` (e.g. `jax.random.fold_in(rng, step)`) to make the
masks a pure function of the key, otherwise the modules' own nnx rng streams
(held in the model state under `rngs` variables) are used.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import constants
from affinity_jax.errors import UserError
from affinity_jax.models import layers
from affinity_jax.models.build import build_backbone
from affinity_jax.ops import cam as cam_ops

AFFINITY_DIMS = (64, 128, 256)


def _backbone(backbone, rngs, norm, kw):
  if isinstance(backbone, str):
    return build_backbone(backbone, rngs=rngs, norm=norm, **kw), backbone
  return backbone, type(backbone).__name__.lower()


class CAMNet(nnx.Module):
  """Classifier for CAMs: channel dropout 0.5 -> GAP -> 1x1 conv (no bias).

  `__call__(x [B,H,W,3], *, train, key=None) -> (logits [B,C], aux)` with
  aux `cams` [B,h,w,C] = relu(w_c . f) (sqrt of it for VGG16) and `features`
  [B,h,w,D]; h, w = ceil(H/8), ceil(W/8).

  With `imagenet_prior=True` (Lite0 only) the backbone keeps its ImageNet classifier
  `backbone/fc`, frozen, and the CAM of each VOC class that has ImageNet counterparts
  (`constants.IMAGENET_CLASSES`; all but person) is the sum of their ImageNet CAMs,
  relu(w_k . f), instead of the trained classifier's; the logits (and so training and
  predicted image labels) stay the trained classifier's. It is meant with the backbone
  frozen too (`cam.frozen=("backbone",)`), so that `fc` sees the features it was
  trained on.
  """

  def __init__(self, backbone_name, *, rngs: nnx.Rngs, num_classes: int = 20,
               norm: str = "frozen", imagenet_prior: bool = False, **backbone_kw):
    if imagenet_prior:
      if backbone_name != "lite0" or num_classes != constants.NUM_CLASSES:
        raise UserError(f"cam.imagenet_prior needs the lite0 backbone and the "
                        f"{constants.NUM_CLASSES} VOC classes (it maps ImageNet classes to "
                        f"them), not {backbone_name!r}")
      backbone_kw["classifier"] = True
    self.backbone, name = _backbone(backbone_name, rngs, norm, backbone_kw)
    self.imagenet_prior = imagenet_prior
    self.sqrt_cams = name == "vgg16"
    self.dropout7 = layers.channel_dropout(0.5, rngs)
    self.classifier = layers.conv(self.backbone.out_channels, num_classes, 1, rngs=rngs,
                                  kernel_init=nnx.initializers.xavier_uniform())

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    kb, kd = layers.split_key(key, 2)
    f, _ = self.backbone(x, train=train, key=kb)
    pooled = jnp.mean(layers.dropout(self.dropout7, f, train=train, key=kd), axis=(1, 2),
                      keepdims=True)
    logits = self.classifier(pooled)[:, 0, 0, :]
    cams = jax.nn.relu(self.classifier(f))
    if self.sqrt_cams:
      cams = jnp.sqrt(cams)
    if self.imagenet_prior:
      columns, groups, has_prior = _imagenet_prior_tables()
      prior = cam_ops.grouped_cams(f, self.backbone.fc.kernel[...][:, columns], groups)
      cams = jnp.where(has_prior, prior, cams)
    return logits, {"cams": cams, "features": f}


@functools.cache
def _imagenet_prior_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`constants.IMAGENET_CLASSES` as arrays: the ImageNet columns used (int [K]), their
  VOC class (float 0/1 [K, 20]) and which VOC classes have any (bool [20])."""
  columns, owner = [], []
  for c, name in enumerate(constants.VOC_CLASSES):
    columns += constants.IMAGENET_CLASSES[name]
    owner += [c] * len(constants.IMAGENET_CLASSES[name])
  groups = np.zeros((len(columns), constants.NUM_CLASSES), np.float32)
  groups[np.arange(len(columns)), owner] = 1.0
  return np.asarray(columns), groups, groups.any(axis=0)


class AffinityNet(nnx.Module):
  """Affinity embedding: 1x1 convs (no bias) + ELU on three levels -> concat -> 1x1 + ELU.

  Levels (ResNet-38) 512->64, 1024->128, 4096->256, concatenated to 448; then
  448->448. Initialisation as the reference: Kaiming normal (fan-in, gain
  sqrt 2) for the three level convs, Xavier uniform with gain 4 for the last.
  `__call__(x, *, train, key=None) -> (embedding [B,h,w,448], aux)` with aux
  `levels` (the three ELU maps).
  """

  def __init__(self, backbone_name, *, rngs: nnx.Rngs, norm: str = "frozen",
               dims: tuple[int, int, int] = AFFINITY_DIMS, **backbone_kw):
    if backbone_name == "vgg16":
      backbone_kw.setdefault("fc6_dilation", 4)
    self.backbone, _ = _backbone(backbone_name, rngs, norm, backbone_kw)
    kaiming = layers.HE_NORMAL
    xavier4 = nnx.initializers.variance_scaling(16.0, "fan_avg", "uniform")
    cin = self.backbone.level_channels
    self.f8_3 = layers.conv(cin[0], dims[0], 1, rngs=rngs, kernel_init=kaiming)
    self.f8_4 = layers.conv(cin[1], dims[1], 1, rngs=rngs, kernel_init=kaiming)
    self.f8_5 = layers.conv(cin[2], dims[2], 1, rngs=rngs, kernel_init=kaiming)
    self.f9 = layers.conv(sum(dims), sum(dims), 1, rngs=rngs, kernel_init=xavier4)
    self.out_channels = sum(dims)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    _, aux = self.backbone(x, train=train, key=key)
    levels = [jax.nn.elu(self.f8_3(aux["low"])), jax.nn.elu(self.f8_4(aux["mid"])),
              jax.nn.elu(self.f8_5(aux["high"]))]
    emb = jax.nn.elu(self.f9(jnp.concatenate(levels, axis=-1)))
    return emb, {"levels": levels}


class SegNet(nnx.Module):
  """DeepLab-LargeFOV-style segmentation head on the backbone.

  fc8: 3x3 conv dilation 12 (512 ch, bias) + ReLU -> channel dropout 0.5 ->
  `classifier` 1x1 conv to `num_labels` (bias); bilinear upsampling to the input size.
  `__call__(x [B,H,W,3], *, train, key=None) -> (logits [B,H,W,L], aux)` with
  aux `logits_small` [B,ceil(H/8),ceil(W/8),L].
  """

  def __init__(self, backbone_name, *, rngs: nnx.Rngs, num_labels: int = 21,
               norm: str = "frozen", width: int = 512, dilation: int = 12, **backbone_kw):
    self.backbone, _ = _backbone(backbone_name, rngs, norm, backbone_kw)
    normal = nnx.initializers.normal(0.01)
    self.fc8 = layers.conv(self.backbone.out_channels, width, 3, dilation=dilation, bias=True,
                           rngs=rngs, kernel_init=normal)
    self.dropout8 = layers.channel_dropout(0.5, rngs)
    self.classifier = layers.conv(width, num_labels, 1, bias=True, rngs=rngs, kernel_init=normal)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    kb, kd = layers.split_key(key, 2)
    f, _ = self.backbone(x, train=train, key=kb)
    h = jax.nn.relu(self.fc8(f))
    h = layers.dropout(self.dropout8, h, train=train, key=kd)
    small = self.classifier(h)
    b, _, _, c = small.shape
    logits = jax.image.resize(small, (b, x.shape[1], x.shape[2], c), "bilinear")
    return logits, {"logits_small": small}
