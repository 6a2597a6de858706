"""VOC builder: a VOC-layout folder written here (XML + SBD), every bad-input error, the real sample."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from affinity_jax import constants
from affinity_jax.data import sources, voc
from affinity_jax.errors import UserError

def _save_jpeg(path, array):
  Image.fromarray(array).save(path, format="JPEG", quality=95)


def _save_palette_png(path, mask):
  im = Image.fromarray(mask, mode="P")
  im.putpalette(constants.voc_palette().reshape(-1).tolist())
  im.save(path, format="PNG")


def _xml(objects):
  objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
  return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def write_voc(root, rng, with_sbd=True):
  """Writes VOCdevkit/VOC2012 under `root`; returns {id: (image, mask, labels)} written."""
  base = os.path.join(root, "VOCdevkit", "VOC2012")
  for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation",
            "SegmentationClassAug"):
    os.makedirs(os.path.join(base, d), exist_ok=True)
  truth = {}
  ids = [f"2008_{i:06d}" for i in range(6)]
  for k, image_id in enumerate(ids):
    h, w = 20 + 4 * k, 28 - 2 * k
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[2:8, 3:9] = k + 1
    mask[8, :] = 255
    _save_jpeg(os.path.join(base, "JPEGImages", f"{image_id}.jpg"), image)
    _save_palette_png(os.path.join(base, "SegmentationClass", f"{image_id}.png"), mask)
    Image.fromarray(mask).save(os.path.join(base, "SegmentationClassAug", f"{image_id}.png"))
    labels = voc.labels_from_mask(mask)
    if k % 2 == 0:
      # The XML also lists a difficult object and a non-VOC name: labels come from the XML.
      extra = constants.VOC_CLASSES[19 - k]
      objects = [(constants.VOC_CLASSES[k], 0), (extra, 1), ("unicorn", 0)]
      with open(os.path.join(base, "Annotations", f"{image_id}.xml"), "w") as f:
        f.write(_xml(objects))
      labels = labels.copy()
      labels[19 - k] = 1
    truth[image_id] = (image, mask, labels)
  lists = os.path.join(base, "ImageSets/Segmentation")
  with open(os.path.join(lists, "train.txt"), "w") as f:
    f.write("\n".join(ids[:3]) + "\n")
  with open(os.path.join(lists, "val.txt"), "w") as f:
    f.write("\n".join(ids[3:]) + "\n")
  if with_sbd:
    with open(os.path.join(lists, "train_aug.txt"), "w") as f:
      f.write("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids[:4]))
  else:
    shutil.rmtree(os.path.join(base, "SegmentationClassAug"))
  return base, truth


def _read_split(data_dir, split):
  src = sources.open_split("voc12", split, data_dir)
  return {ex["id"]: ex for ex in (src[i] for i in range(len(src)))}


def test_builder_on_written_folder(tmp_path):
  base, truth = write_voc(str(tmp_path / "manual"), np.random.default_rng(0))
  data_dir = str(tmp_path / "data")
  # The VOCdevkit folder's parent is accepted too.
  sources.prepare("voc12", data_dir, manual_dir=str(tmp_path / "manual" / "VOCdevkit"))
  splits = {s: _read_split(data_dir, s) for s in ("train", "val", "train_aug")}
  assert sorted(splits["train"]) == sorted(truth)[:3]
  assert sorted(splits["val"]) == sorted(truth)[3:]
  assert sorted(splits["train_aug"]) == sorted(truth)[:4]
  for split in splits.values():
    for image_id, ex in split.items():
      image, mask, labels = truth[image_id]
      jpeg = np.asarray(Image.open(os.path.join(base, "JPEGImages", f"{image_id}.jpg")))
      np.testing.assert_array_equal(ex["image"], jpeg)
      np.testing.assert_array_equal(ex["mask"], mask)
      np.testing.assert_array_equal(ex["labels"], labels)
      assert (ex["height"], ex["width"]) == mask.shape
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == mask.shape + (3,)
  # Labels from XML include the difficult object and skip the unknown name.
  assert splits["train"]["2008_000000"]["labels"][19] == 1
  assert splits["train"]["2008_000000"]["labels"].sum() == 2


def test_no_sbd_means_no_train_aug_and_voc2012_path_works(tmp_path):
  base, _ = write_voc(str(tmp_path / "manual"), np.random.default_rng(1), with_sbd=False)
  builder = sources.prepare("voc12", str(tmp_path / "data"), manual_dir=base)
  assert sorted(builder.info.splits) == ["train", "val"]
  with pytest.raises(UserError, match="train_aug"):
    sources.open_split("voc12", "train_aug", str(tmp_path / "data"))


def _break(kind, base):
  first = "2008_000000"
  if kind == "missing_folder":
    os.rename(os.path.join(base, "JPEGImages"), os.path.join(base, "JPEG"))
    return "JPEGImages"
  if kind == "missing_list":
    os.remove(os.path.join(base, "ImageSets/Segmentation/val.txt"))
    return "val.txt"
  if kind == "no_image":
    os.remove(os.path.join(base, "JPEGImages", f"{first}.jpg"))
    return f"{first}.jpg"
  if kind == "no_mask":
    os.remove(os.path.join(base, "SegmentationClass", f"{first}.png"))
    return f"SegmentationClass/{first}.png"
  if kind == "size_mismatch":
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(
        os.path.join(base, "SegmentationClass", f"{first}.png"))
    return f"{first}.png"
  if kind == "unreadable_image":
    with open(os.path.join(base, "JPEGImages", f"{first}.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return f"{first}.jpg"
  if kind == "bad_mask_values":
    path = os.path.join(base, "SegmentationClass", f"{first}.png")
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 0] = 30
    Image.fromarray(mask).save(path)
    return f"{first}.png"
  if kind == "duplicate_id":
    with open(os.path.join(base, "ImageSets/Segmentation/train.txt"), "a") as f:
      f.write(first + "\n")
    return "train.txt"
  if kind == "sbd_without_list":
    os.remove(os.path.join(base, "ImageSets/Segmentation/train_aug.txt"))
    return "SegmentationClassAug"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_folder", "missing_list", "no_image", "no_mask",
                                  "size_mismatch", "unreadable_image", "bad_mask_values",
                                  "duplicate_id", "sbd_without_list"])
def test_bad_inputs_raise_user_error_naming_the_file(tmp_path, kind):
  base, _ = write_voc(str(tmp_path / "manual"), np.random.default_rng(2))
  name = _break(kind, base)
  with pytest.raises(UserError, match=name.replace(".", r"\.")) as e:
    sources.prepare("voc12", str(tmp_path / "data"), manual_dir=base)
  assert "\n" not in str(e.value)


def test_missing_manual_dir_and_unprepared_split(tmp_path):
  with pytest.raises(UserError, match="does not exist.*--config.data.manual_dir=PATH"):
    sources.prepare("voc12", str(tmp_path / "data"), manual_dir=str(tmp_path / "nope"))
  with pytest.raises(UserError, match="--manual_dir=PATH"):
    sources.prepare("voc12", str(tmp_path / "data"), manual_dir=str(tmp_path / "nope"),
                    manual_flag="--manual_dir")
  with pytest.raises(UserError, match="not prepared"):
    sources.open_split("voc12", "train", str(tmp_path / "data"))


@pytest.mark.parametrize("variant", ["cpu", "sample"])
def test_real_photo_variants_without_their_folder_say_which_flag(variant, tmp_path, monkeypatch):
  # :cpu and :sample default to a folder beside the repository; elsewhere the run stops
  # with one line that names the flag to pass.
  from affinity_jax import config_lib
  config = config_lib.load_config(os.path.abspath(f"configs/voc12_lite0.py:{variant}"))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError) as e:
    sources.prepare("voc12", str(tmp_path / "data"), config.data.manual_dir)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(config.data.manual_dir) and "--config.data.manual_dir=PATH" in message


def test_mask_helpers():
  buf = io.BytesIO()
  mask = np.array([[0, 1, 20], [255, 3, 3]], np.uint8)
  _save_palette_png(buf, mask)
  buf.seek(0)
  assert Image.open(buf).mode == "P"
  np.testing.assert_array_equal(voc.labels_from_mask(mask).nonzero()[0], [0, 2, 19])


def test_real_sample(voc_sample, tmp_path):
  sample = os.path.join(voc_sample, "VOC2012")
  data_dir = str(tmp_path / "data")
  builder = sources.prepare("voc12", data_dir, manual_dir=sample)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 24, "val": 16}
  for split in ("train", "val"):
    seen = np.zeros(20, int)
    for image_id, ex in _read_split(data_dir, split).items():
      mask = np.asarray(Image.open(os.path.join(sample, "SegmentationClass", f"{image_id}.png")))
      np.testing.assert_array_equal(ex["mask"], mask)
      image = np.asarray(Image.open(os.path.join(sample, "JPEGImages", f"{image_id}.jpg")))
      np.testing.assert_array_equal(ex["image"], image)
      assert (ex["height"], ex["width"]) == mask.shape
      assert set(np.unique(ex["mask"])) <= set(range(21)) | {255}
      present = sorted(set(np.unique(mask).tolist()) - {0, 255})
      np.testing.assert_array_equal(np.nonzero(ex["labels"])[0] + 1, present)
      seen += ex["labels"]
    assert (seen > 0).all(), f"{split}: every class appears in the sample"
