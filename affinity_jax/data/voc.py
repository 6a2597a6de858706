"""PASCAL VOC 2012 (+ SBD) as a TFDS builder written as array_record.

The manual directory holds the standard layout (either the `VOCdevkit` folder
or the `VOC2012` folder inside it may be given):

  VOC2012/JPEGImages/<id>.jpg
  VOC2012/SegmentationClass/<id>.png          palette PNGs, read as indices
  VOC2012/Annotations/<id>.xml                optional: image-level labels
  VOC2012/ImageSets/Segmentation/{train,val}.txt
  VOC2012/SegmentationClassAug/<id>.png       optional (SBD): index PNGs
  VOC2012/ImageSets/Segmentation/train_aug.txt   (or ImageSets/SegmentationAug/)

Splits: `train`, `val`, and `train_aug` when the SBD part is present.
Images are stored as their original JPEG bytes and masks as index PNG bytes;
`affinity_jax.data.sources` decodes them with PIL (no TensorFlow anywhere).
Every problem with the files raises a one-line `UserError` naming the file.
"""

import io
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from affinity_jax import constants
from affinity_jax.errors import UserError

_LIST_DIRS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug")
_VALID_MASK_VALUES = np.array(list(range(constants.NUM_LABELS)) + [constants.IGNORE])


def find_voc_root(manual_dir: str, flag: str = "--config.data.manual_dir") -> str:
  """Returns the `VOC2012` folder given it, its `VOCdevkit` parent or the folder above.

  Args:
    manual_dir: the folder the user gave.
    flag: the command-line flag that sets it, named in the error when it does not exist.

  Raises:
    UserError: `manual_dir` does not exist or holds no VOC layout.
  """
  candidates = [manual_dir, os.path.join(manual_dir, "VOC2012"),
                os.path.join(manual_dir, "VOCdevkit", "VOC2012")]
  for c in candidates:
    if os.path.isdir(os.path.join(c, "JPEGImages")):
      return c
  if not os.path.isdir(manual_dir):
    raise UserError(f"{manual_dir}: VOC folder does not exist; pass the folder holding "
                    f"VOCdevkit/VOC2012 with {flag}=PATH")
  raise UserError(f"{manual_dir}: no JPEGImages folder here, in VOC2012/ or in VOCdevkit/VOC2012/")


def read_id_list(path: str) -> list[str]:
  """Reads a split list: one id per line, or a line of paths (`/JPEGImages/<id>.jpg ...`)."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: split list file is missing")
  ids = []
  with open(path) as f:
    for line in f:
      tok = line.strip().split()
      if tok:
        ids.append(os.path.splitext(os.path.basename(tok[0]))[0])
  if not ids:
    raise UserError(f"{path}: split list file is empty")
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise UserError(f"{path}: id {dup} is listed twice")
  return ids


def _find_list(root: str, name: str) -> str | None:
  for d in _LIST_DIRS:
    p = os.path.join(root, d, f"{name}.txt")
    if os.path.isfile(p):
      return p
  return None


def split_files(root: str) -> dict[str, tuple[str, str]]:
  """Maps each available split to (list file, mask folder); checks the folders exist."""
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise UserError(f"{os.path.join(root, sub)}: required VOC folder is missing")
  splits = {}
  for name in ("train", "val"):
    p = os.path.join(root, "ImageSets/Segmentation", f"{name}.txt")
    if not os.path.isfile(p):
      raise UserError(f"{p}: split list file is missing")
    splits[name] = (p, os.path.join(root, "SegmentationClass"))
  aug_dir = os.path.join(root, "SegmentationClassAug")
  if os.path.isdir(aug_dir):
    p = _find_list(root, "train_aug")
    if p is None:
      raise UserError(f"{aug_dir}: SBD masks found but no train_aug.txt in "
                      f"{root}/ImageSets/Segmentation or ImageSets/SegmentationAug")
    splits["train_aug"] = (p, aug_dir)
  return splits


def read_mask(path: str) -> np.ndarray:
  """Reads a VOC mask as label indices [H, W] uint8 (palette PNGs keep their indices)."""
  try:
    with Image.open(path) as im:
      if im.mode not in ("P", "L"):
        raise UserError(f"{path}: mask must be a palette or greyscale PNG, got mode {im.mode}")
      mask = np.asarray(im, dtype=np.uint8)
  except UserError:
    raise
  except Exception as e:  # PIL raises many types for broken files.
    raise UserError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None
  bad = np.setdiff1d(np.unique(mask), _VALID_MASK_VALUES)
  if bad.size:
    raise UserError(f"{path}: mask values {bad.tolist()[:5]} outside 0..20 and 255")
  return mask


def image_size(path: str) -> tuple[int, int]:
  """Fully decodes an image to check it is readable; returns (height, width)."""
  try:
    with Image.open(path) as im:
      im.load()
      return im.size[1], im.size[0]
  except Exception as e:
    raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def labels_from_xml(path: str) -> np.ndarray:
  """Multi-hot [20] uint8 of the object classes in a VOC annotation (difficult included)."""
  try:
    tree = ET.parse(path)
  except Exception as e:
    raise UserError(f"{path}: unreadable XML annotation ({e})") from None
  labels = np.zeros(constants.NUM_CLASSES, np.uint8)
  for obj in tree.getroot().iter("object"):
    name = (obj.findtext("name") or "").strip()
    if name in constants.VOC_CLASSES:
      labels[constants.VOC_CLASSES.index(name)] = 1
  return labels


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
  """Multi-hot [20] uint8 of the classes (label ids 1..20) present in a mask."""
  labels = np.zeros(constants.NUM_CLASSES, np.uint8)
  values = np.unique(mask)
  values = values[(values >= 1) & (values <= constants.NUM_CLASSES)]
  labels[values - 1] = 1
  return labels


def encode_png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def make_example(root: str, image_id: str, mask_dir: str) -> dict:
  """Reads and checks one VOC example; returns the stored feature dict."""
  img_path = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
  if not os.path.isfile(img_path):
    raise UserError(f"{img_path}: listed id {image_id} has no image")
  h, w = image_size(img_path)
  mask_path = os.path.join(mask_dir, f"{image_id}.png")
  if not os.path.isfile(mask_path):
    raise UserError(f"{mask_path}: listed id {image_id} has no mask")
  mask = read_mask(mask_path)
  if mask.shape != (h, w):
    raise UserError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                    f"image size {w}x{h}")
  xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
  labels = labels_from_xml(xml_path) if os.path.isfile(xml_path) else labels_from_mask(mask)
  with open(img_path, "rb") as f:
    image_bytes = f.read()
  return {"image": image_bytes, "mask": encode_png(mask), "labels": labels,
          "id": image_id, "height": h, "width": w}


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of our builders: states its own code path.

  TFDS otherwise locates a packaged builder through `importlib_resources`,
  which is not installed here (and not needed for anything else).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    import sys
    return epath.Path(sys.modules[cls.__module__].__file__)


def stored_features() -> tfds.features.FeaturesDict:
  """The on-disk features shared by every builder here (encoded bytes, decoded by `sources`)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),   # JPEG or PNG bytes
      "mask": tfds.features.Tensor(shape=(), dtype=np.object_),    # index PNG bytes or b""
      "labels": tfds.features.Tensor(shape=(constants.NUM_CLASSES,), dtype=np.uint8),
      "id": tfds.features.Text(),
      "height": tfds.features.Scalar(dtype=np.int32),
      "width": tfds.features.Scalar(dtype=np.int32),
  })


class Voc12(ArrayRecordBuilder):
  """PASCAL VOC 2012 segmentation splits (+ SBD train_aug) from a manual directory."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Give the VOCdevkit (or VOCdevkit/VOC2012) folder as manual_dir; see docs/data.md.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="PASCAL VOC 2012 segmentation (+ SBD train_aug).",
        features=stored_features())

  def _split_generators(self, dl_manager):
    root = find_voc_root(os.fspath(dl_manager.manual_dir))
    splits = split_files(root)
    # Read every list first so a missing or empty list fails before any work.
    lists = {name: (read_id_list(p), mdir) for name, (p, mdir) in splits.items()}
    return {name: self._generate_examples(root, ids, mdir)
            for name, (ids, mdir) in lists.items()}

  def _generate_examples(self, root, ids, mask_dir):
    for image_id in ids:
      yield image_id, make_example(root, image_id, mask_dir)
