r"""The paper's settings: ResNet-38 on PASCAL VOC 2012 + SBD (train_aug).

Prepare VOC first (docs/data.md), convert the ImageNet weights the paper used (ademxapp
`ilsvrc-cls_rna-a1_cls1000_ep-0001.params`, docs/models.md), then

  python -m affinity_jax.main --config=configs/voc12_resnet38.py \
      --workdir=runs/voc12_resnet38 --config.data.manual_dir=/data/VOCdevkit \
      --config.model.pretrained=/data/ilsvrc-cls_rna-a1_cls1000_ep-0001.params

Expected (reference code): CAM 47.7, CAM+RW 61.0 mIoU on VOC train. Variant `tiny`
shrinks every stage for a smoke test on a VOC-layout folder (numbers meaningless).

Variant `from_reference` evaluates the reference's released networks instead of training
(docs/interop.md): CAMs from psa's `res38_cls.pth`, the walk from its `res38_aff.pth`,
pseudo labels scored on VOC train, no SBD needed:

  python -m affinity_jax.main --config=configs/voc12_resnet38.py:from_reference \
      --workdir=runs/psa_reference --config.data.manual_dir=/data/VOCdevkit \
      --config.cam.weights=res38_cls.pth --config.aff.weights=res38_aff.pth
"""

from affinity_jax import config_lib
from affinity_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.model.backbone = "resnet38"
  return config_lib.apply_variant(c, arg, VARIANTS)


def from_reference(c):
  """psa's inference on VOC train, from networks given by `cam.weights` / `aff.weights`.

  As psa's `infer_cls.py` and `infer_aff.py`: every image and scale at its own size,
  unpadded, and each pass's CAM cells all stretched over the image (`data.infer_pad=0`,
  no canvases: one compiled program per image size and scale); the walk on the image
  padded to a multiple of 8 and on the reference's pair set (`rw.border="reference"`),
  alpha 16, beta 8, t = 256; no segmentation net (the reference ships none).
  CAM+RW+dCRF is ours.
  """
  c.data.train_split = c.data.label_split = c.data.eval_split = "train"
  c.data.infer_canvases = ()
  c.data.infer_pad = 0
  c.aff.border = c.rw.border = "reference"
  c.seg.enabled = False


VARIANTS = {"tiny": defaults.shrink_for_smoke_test, "from_reference": from_reference}
