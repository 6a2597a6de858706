r"""The paper's VGG16 variant (DeepLab-LargeFOV backbone) on PASCAL VOC 2012 + SBD.

Convert Keras' ImageNet VGG16 (`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`,
docs/models.md), then

  python -m affinity_jax.main --config=configs/voc12_vgg16.py \
      --workdir=runs/voc12_vgg16 --config.data.manual_dir=/data/VOCdevkit \
      --config.model.pretrained=/data/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5

Expected (reference code): CAM 48.9, CAM+RW 59.6 mIoU on VOC train. Variant `tiny`
is the smoke test.
"""

from affinity_jax import config_lib
from affinity_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.model.backbone = "vgg16"
  c.cam.train.lr = 0.1
  return config_lib.apply_variant(c, arg, VARIANTS)


VARIANTS = {"tiny": defaults.shrink_for_smoke_test}
