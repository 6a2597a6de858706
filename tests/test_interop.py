"""The reference's files in and out: psa's trained networks (`cam.weights`, `aff.weights`),
other methods' CAMs (`python -m affinity_jax.cams import`) and ours exported.

End to end on a tiny VOC-layout folder written here, against the torch transcription of
psa's `infer_cls.py` / `infer_aff.py` (`psa_torch.py`) with random weights that torch
writes to `.pth` files in psa's names. The images are 75 x 100, so no inference scale is
a multiple of 8: `:from_reference` runs each unpadded, as psa does. The stored CAMs agree
to 1e-3 (they are stored as float16; seen: 2.5e-4) and the walk labels on 99.9% of the
pixels or more (seen: all). `main` runs in a subprocess on one CPU device, as a user
runs it.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from affinity_jax import constants
from affinity_jax.errors import UserError
from affinity_jax.labels import cam_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (75, 100)
CAM_TOLERANCE = 1e-3      # |ours - psa's| of the stored CAMs, which lie in [0, 1].
LABEL_AGREEMENT = 0.999   # Fraction of pixels whose walk labels are equal.


# ---------------------------------------------------------------- CAM files, no torch

def _cams(rng, h=5, w=6, k=2):
  return rng.random((h, w, k)).astype(np.float32), np.array([3, 15], np.int32)[:k]


@pytest.mark.parametrize("fmt", cam_files.FORMATS)
def test_every_format_round_trips(tmp_path, fmt):
  cams, keys = _cams(np.random.default_rng(0))
  path = cam_files.path(str(tmp_path), "2007_000032", fmt)
  cam_files.write(path, fmt, cams, keys)
  got, got_keys = cam_files.read(path, fmt, (5, 6))
  np.testing.assert_array_equal(got, cams)
  np.testing.assert_array_equal(got_keys, keys)


def test_psa_file_is_what_psa_writes_and_reads(tmp_path):
  """psa's infer_aff.py reads `np.load(path).item()` and indexes it by class index."""
  cams, keys = _cams(np.random.default_rng(1))
  path = cam_files.path(str(tmp_path), "a", "psa")
  cam_files.write(path, "psa", cams, keys)
  d = np.load(path, allow_pickle=True).item()
  assert sorted(d) == [2, 14] and all(type(k) is int for k in d)
  np.testing.assert_array_equal(d[14], cams[..., 1])


def test_keys_are_sorted_and_label_ids(tmp_path):
  path = str(tmp_path / "a.npy")
  np.save(path, {7: np.full((2, 3), 0.5, np.float32), 0: np.zeros((2, 3), np.float64)})
  cams, keys = cam_files.read(path, "psa", (2, 3))
  assert keys.tolist() == [1, 8] and cams.shape == (2, 3, 2) and cams.dtype == np.float32
  assert (cams[..., 1] == 0.5).all()


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "ran"
  path = str(tmp_path / "evil.npy")
  np.save(path, {0: _RunsCode(marker)}, allow_pickle=True)
  # The same file through np.load(allow_pickle=True), as psa reads it, would run it:
  # here it is refused before the global is called.
  with pytest.raises(UserError, match=r"evil\.npy: refusing to unpickle (posix|nt)\.system"):
    cam_files.read(path, "psa")
  assert not marker.exists()
  # Also a bare pickle of a call, not wrapped in an array.
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False,
                                             "shape": ()})
    pickle.dump(_RunsCode(marker), f)
  with pytest.raises(UserError, match="refusing to unpickle"):
    cam_files.read(path, "irn")
  assert not marker.exists()


def _one_line(error):
  message = str(error.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("content, fmt, words", [
    ({}, "psa", "holds no CAMs"),
    ({20: np.zeros((5, 6))}, "psa", "unknown class index 20"),
    ({-1: np.zeros((5, 6))}, "psa", "unknown class index -1"),
    ({0: np.full((5, 6), np.nan)}, "psa", "30 CAM values are NaN"),
    ({0: np.zeros((4, 6))}, "psa", "CAMs are 4x6 (H x W) but the image is 5x6"),
    ({0: np.zeros((5, 6)), 1: np.zeros((5, 7))}, "psa", "CAMs of shapes"),
    ({0: np.full((5, 6), 3.0)}, "psa", "CAM values span [3, 3]"),
    ({"keys": np.array([1]), "high_res": np.zeros((1, 5, 6))}, "psa", "use --format=irn"),
    ({0: np.zeros((5, 6))}, "irn", "use --format=psa"),
    ({"keys": np.array([1, 2]), "high_res": np.zeros((1, 5, 6))}, "irn", "for 2 keys"),
    ({"keys": np.array([], np.int64), "high_res": np.zeros((0, 5, 6))}, "irn", "holds no CAMs"),
    ({"keys": np.array([3, 3]), "high_res": np.zeros((2, 5, 6))}, "irn", "repeat"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, fmt, words):
  path = str(tmp_path / "2007_000032.npy")
  np.save(path, content, allow_pickle=True)
  with pytest.raises(UserError) as e:
    cam_files.read(path, fmt, (5, 6))
  message = _one_line(e)
  assert message.startswith(path) and words in message, message


def test_bad_npz_and_missing_files(tmp_path):
  path = str(tmp_path / "a.npz")
  np.savez(path, cams=np.zeros((1, 5, 6)))
  with pytest.raises(UserError, match=r"a\.npz: an npz CAM file holds `keys` and `cams`"):
    cam_files.read(path, "npz")
  with pytest.raises(UserError, match=r"b\.npy: CAM file missing"):
    cam_files.read(str(tmp_path / "b.npy"), "psa")
  (tmp_path / "c.npy").write_bytes(b"not numpy")
  with pytest.raises(UserError, match=r"c\.npy: not a readable \.npy file"):
    cam_files.read(str(tmp_path / "c.npy"), "psa")
  with pytest.raises(UserError, match="CAM format 'seam'"):
    cam_files.read(path, "seam")


def test_irn_file_with_torch_tensors_reads_without_torch_objects(tmp_path):
  """IRN's make_cam.py saves `keys` and `cam` as torch tensors: rebuilt as NumPy."""
  torch = pytest.importorskip("torch", reason="torch writes the IRN file")
  high = np.random.default_rng(2).random((2, 5, 6)).astype(np.float32)
  path = str(tmp_path / "a.npy")
  np.save(path, {"keys": torch.tensor([14, 2]), "cam": torch.rand(2, 2, 2),
                 "high_res": high})
  cams, keys = cam_files.read(path, "irn", (5, 6))
  assert keys.tolist() == [3, 15]   # Sorted: class 2 (label 3) first.
  np.testing.assert_array_equal(cams, np.moveaxis(high[::-1], 0, -1))


# ---------------------------------------------------------------- end to end, with torch

def _write_voc(root):
  """VOC2012/ with 3 train and 1 val images of SIZE: a gradient and two objects each."""
  base = os.path.join(root, "VOC2012")
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(base, d), exist_ok=True)
  rng = np.random.default_rng(0)
  h, w = SIZE
  ids = [f"2008_{i:06d}" for i in range(4)]
  for k, image_id in enumerate(ids):
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([yy * 4, xx * 3, 255 - yy * 2], -1).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for label, (y0, x0) in ((2 * k + 1, (8, 10 + 2 * k)), (2 * k + 2, (36 - k, 60))):
      mask[y0:y0 + 20, x0:x0 + 28] = label
      image[y0:y0 + 20, x0:x0 + 28] = rng.integers(0, 256, 3)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(base, "JPEGImages", f"{image_id}.jpg"),
                                quality=95)
    png = Image.fromarray(mask, mode="P")
    png.putpalette(constants.voc_palette().reshape(-1).tolist())
    png.save(os.path.join(base, "SegmentationClass", f"{image_id}.png"))
  lists = os.path.join(base, "ImageSets/Segmentation")
  with open(os.path.join(lists, "train.txt"), "w") as f:
    f.write("\n".join(ids[:3]) + "\n")
  with open(os.path.join(lists, "val.txt"), "w") as f:
    f.write(ids[3] + "\n")
  return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """psa's two ResNet-38 networks with random weights, as torch modules and `.pth` files."""
  psa = pytest.importorskip("psa_torch")
  torch = psa.torch
  root = tmp_path_factory.mktemp("psa")
  torch.manual_seed(0)
  backbone = psa.randomize(psa.RefResNet38(), seed=0).state_dict()
  cls, aff = psa.RefCAM(), psa.RefAff()
  cls.load_state_dict(backbone, strict=False)
  aff.load_state_dict(backbone, strict=False)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    cls.fc8.weight.copy_(torch.randn(cls.fc8.weight.shape, generator=g) * 0.05)
    for conv in (aff.f8_3, aff.f8_4, aff.f8_5, aff.f9):
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=g)
                        * 2 / conv.weight[0].numel() ** 0.5)
  cls.eval(), aff.eval()
  paths = {"cls": str(root / "res38_cls.pth"), "aff": str(root / "res38_aff.pth")}
  torch.save(cls.state_dict(), paths["cls"])
  torch.save(aff.state_dict(), paths["aff"])
  return dict(psa=psa, cls=cls, aff=aff, paths=paths,
              voc=_write_voc(str(root / "voc")))


def _run(module, *args, cwd=REPO):
  """`python -m affinity_jax.<module> ARGS` on one CPU device; (returncode, output)."""
  env = dict(os.environ, PYTHONPATH=REPO, AFFINITY_JAX_NO_REEXEC="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-m", f"affinity_jax.{module}", *args], cwd=cwd,
                     env=env, capture_output=True, text=True, timeout=1200)
  return p.returncode, p.stdout + p.stderr


def _config_args(ref, *extra):
  return ["--config=configs/voc12_resnet38.py:from_reference",
          f"--config.data.manual_dir={ref['voc']}", "--config.data.num_workers=0",
          "--config.rw.dcrf=False", *extra]


def _train_images(workdir):
  from affinity_jax.data import sources
  split = sources.open_split("voc12", "train", os.path.join(workdir, "tfds"))
  return [split[i] for i in range(len(split))]


def _psa_walk(ref, image, cam_dict):
  return ref["psa"].infer_aff(ref["aff"], image, cam_dict)


def _agreement(workdir, ref, psa_cams):
  from affinity_jax.workdir import Workdir
  files = Workdir(workdir)
  same = total = 0
  labels_seen = []
  for example in _train_images(workdir):
    want = _psa_walk(ref, example["image"], psa_cams[example["id"]])
    got = files.rw.load(example["id"])
    same += int((got == want).sum())
    total += want.size
    labels_seen.append(len(np.unique(want)))
  return same / total, labels_seen


@pytest.mark.slow
def test_reference_weights_give_psa_inference_end_to_end(reference, tmp_path):
  """`main` with psa's `.pth` files: no training, and the stored CAMs and walk labels are
  what psa's infer_cls.py and infer_aff.py give on the same images."""
  ref = reference
  workdir = str(tmp_path / "run")
  code, out = _run("main", *_config_args(
      ref, f"--config.cam.weights={ref['paths']['cls']}",
      f"--config.aff.weights={ref['paths']['aff']}"), f"--workdir={workdir}")
  assert code == 0, out
  assert "[train_cam] done already, skipped" in out, out
  assert "[aff_labels] done already, skipped" in out, out
  assert "[train_aff] done already, skipped" in out, out
  assert not os.path.exists(os.path.join(workdir, "cam", "ckpt"))
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    assert "CAM+RW" in json.dumps(json.load(f))

  from affinity_jax.workdir import Workdir
  files = Workdir(workdir)
  psa_cams, worst = {}, 0.0
  for example in _train_images(workdir):
    want = ref["psa"].infer_cls(ref["cls"], example["image"], example["labels"])
    psa_cams[example["id"]] = want
    cams, keys = files.cams.load(example["id"])
    assert keys.tolist() == [k + 1 for k in sorted(want)]
    worst = max(worst, float(np.abs(cams - np.stack([want[k] for k in sorted(want)], -1)).max()))
  assert worst <= CAM_TOLERANCE, worst
  agreement, labels_seen = _agreement(workdir, ref, psa_cams)
  assert agreement >= LABEL_AGREEMENT, agreement
  assert max(labels_seen) >= 2, labels_seen   # The walk did not flatten every image.
  print(f"CAMs: largest difference {worst:.2e}; walk labels: {agreement:.6f} equal, "
        f"labels per image {labels_seen}")

  # Exported in psa's format, the CAMs are psa's to the same tolerance.
  out_dir = str(tmp_path / "exported")
  code, out = _run("cams", "export", "--format=psa", f"--to={out_dir}", f"--workdir={workdir}")
  assert code == 0, out
  for image_id, want in psa_cams.items():
    got = np.load(os.path.join(out_dir, f"{image_id}.npy"), allow_pickle=True).item()
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= CAM_TOLERANCE


@pytest.mark.slow
def test_imported_psa_cams_walk_as_psa_walks_them(reference, tmp_path):
  """Another method's CAMs in psa's `.npy` dicts, imported, then the walk from psa's
  AffinityNet weights: the labels psa's infer_aff.py gives on the same files."""
  ref = reference
  psa_dir = tmp_path / "psa_cams"
  psa_dir.mkdir()
  rng = np.random.default_rng(3)
  h, w = SIZE
  psa_cams = {}
  for i, image_id in enumerate(["2008_000000", "2008_000001", "2008_000002"]):
    # Smooth blobs, normalised by their max as psa does; classes unlike the masks'.
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    cams = {c: np.exp(-((yy - rng.random()) ** 2 + (xx - rng.random()) ** 2) * 8)
            for c in (i, 10 + i)}
    psa_cams[image_id] = {c: (v / (v.max() + 1e-5)).astype(np.float32) for c, v in cams.items()}
    np.save(str(psa_dir / f"{image_id}.npy"), psa_cams[image_id])
  workdir = str(tmp_path / "run")
  args = _config_args(ref, f"--config.aff.weights={ref['paths']['aff']}")

  # A missing file: one line naming it, nothing imported.
  os.rename(psa_dir / "2008_000001.npy", tmp_path / "aside.npy")
  code, out = _run("cams", "import", "--format=psa", f"--from={psa_dir}",
                   f"--workdir={workdir}", *args)
  assert code == 2 and out.strip().splitlines()[-1] == (
      f"error: {psa_dir}/2008_000001.npy: CAM file missing (1 of the 3 images of train "
      f"have none in {psa_dir})"), out
  os.rename(tmp_path / "aside.npy", psa_dir / "2008_000001.npy")

  code, out = _run("cams", "import", "--format=psa", f"--from={psa_dir}",
                   f"--workdir={workdir}", *args)
  assert code == 0, out
  code, out = _run("main", *args, f"--workdir={workdir}")
  assert code == 0, out
  assert "[infer_cam] done already, skipped" in out and "[train_cam] done already" in out
  agreement, labels_seen = _agreement(workdir, ref, psa_cams)
  assert agreement >= LABEL_AGREEMENT, agreement
  assert max(labels_seen) >= 2, labels_seen
  print(f"walk labels from imported CAMs: {agreement:.6f} equal, labels per image "
        f"{labels_seen}")

  # The config key does the same import inside main's infer_cam stage.
  other = str(tmp_path / "by_key")
  code, out = _run("main", *args, f"--config.cam.cams_from={psa_dir}", "--mode=infer_cam",
                   f"--workdir={other}")
  assert code == 0 and "imported the psa CAMs of 3 images" in out, out
  from affinity_jax.workdir import Workdir
  for image_id in psa_cams:
    for a, b in zip(Workdir(workdir).cams.load(image_id), Workdir(other).cams.load(image_id)):
      np.testing.assert_array_equal(a, b)


def test_a_network_file_for_another_network_is_refused(reference):
  from flax import nnx

  import weight_files
  from affinity_jax.models import CAMNet
  from affinity_jax.stages import common
  model = weight_files.nan_model(lambda: CAMNet("resnet38", rngs=nnx.Rngs(0)))
  with pytest.raises(UserError) as e:
    common.load_trained(model, reference["paths"]["aff"], "cam")
  message = _one_line(e)
  assert message.startswith(f"cam.weights: {reference['paths']['aff']} lacks 1 arrays of "
                            "the trained resnet38 CAMNet (e.g. classifier/kernel)"), message
  with pytest.raises(UserError, match="cam.weights: .* holds no training checkpoint"):
    common.load_trained(model, os.path.dirname(reference["paths"]["aff"]), "cam")


@pytest.mark.slow
def test_refine_is_the_walk_stage_on_one_image(tiny_workdir):
  """`affinity_jax.refine` on an image in memory gives the label infer_rw stored."""
  import affinity_jax
  from affinity_jax import demo
  ctx = demo.open_workdir(tiny_workdir, run=False)
  walker = ctx.walker()
  ids = demo.image_ids(ctx)[:3]
  for image_id in ids:
    image = ctx.example(image_id)["image"]
    cams, keys = ctx.files.cams.load(image_id)
    as_psa = {int(k) - 1: cams[..., i] for i, k in enumerate(keys)}
    np.testing.assert_array_equal(affinity_jax.refine(image, as_psa, walker),
                                  ctx.files.rw.load(image_id))
  # The store's form, from the network itself and the workdir's walk settings.
  got = affinity_jax.refine(image, (cams, keys), ctx.trained_model("aff"), ctx.config.rw)
  np.testing.assert_array_equal(got, ctx.files.rw.load(image_id))
  with pytest.raises(UserError, match=r"cams: CAMs are 5x5 \(H x W\) but the image is"):
    affinity_jax.refine(image, {0: np.zeros((5, 5))}, walker)


@pytest.mark.parametrize("argv, words", [
    ([], "first argument: one of import, export"),
    (["import", "--format=psa", "--workdir=w"], "missing --from=..."),
    (["export", "--format=psa", "--from=d", "--workdir=w"], "unknown flag --from for export"),
    (["import", "--format=psa", "--from=d", "--workdir=w", "--config.rw.t=8"],
     "--config.KEY overrides need --config"),
])
def test_command_line_errors_are_one_line(argv, words):
  from affinity_jax import cams
  with pytest.raises(UserError) as e:
    cams.parse(argv)
  assert words in _one_line(e)


def test_command_line_takes_config_overrides_for_import():
  from affinity_jax import cams
  command, values, overrides = cams.parse(
      ["import", "--format", "irn", "--from=d", "--workdir=w", "--config=c.py",
       "--config.aff.weights=a.pth"])
  assert (command, values["format"], values["from"]) == ("import", "irn", "d")
  assert overrides == [("aff.weights", "a.pth")]
