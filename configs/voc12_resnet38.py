r"""The paper's settings: ResNet-38 on PASCAL VOC 2012 + SBD (train_aug).

Prepare VOC first (docs/data.md), convert the ImageNet weights the paper used (ademxapp
`ilsvrc-cls_rna-a1_cls1000_ep-0001.params`, docs/models.md), then

  python -m affinity_jax.main --config=configs/voc12_resnet38.py \
      --workdir=runs/voc12_resnet38 --config.data.manual_dir=/data/VOCdevkit \
      --config.model.pretrained=/data/ilsvrc-cls_rna-a1_cls1000_ep-0001.params

Expected (reference code): CAM 47.7, CAM+RW 61.0 mIoU on VOC train. Variant `tiny`
shrinks every stage for a smoke test on a VOC-layout folder (numbers meaningless).
"""

from affinity_jax import config_lib
from affinity_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.model.backbone = "resnet38"
  return config_lib.apply_variant(c, arg, VARIANTS)


VARIANTS = {"tiny": defaults.shrink_for_smoke_test}
