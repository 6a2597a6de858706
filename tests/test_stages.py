"""The whole pipeline end to end on tiny data, resuming, and its one-line errors."""

import copy
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import voc_tiny

from affinity_jax import config_lib
from affinity_jax import workdir as workdir_layout
from affinity_jax import constants
from affinity_jax import sharding
from affinity_jax.errors import UserError
from affinity_jax.models import heads
from affinity_jax.models.build import build_backbone
from affinity_jax.inference import walk
from affinity_jax.stages import common
from affinity_jax.stages import evaluate
from affinity_jax.stages import pipeline
from affinity_jax.training import optim
from affinity_jax.weights import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tiny_workdir, tmp_path_factory):
  """A copy of the test run's finished tiny run (these tests delete files in it)."""
  workdir = str(tmp_path_factory.mktemp("stages") / "scenes_tiny")
  shutil.copytree(tiny_workdir, workdir)
  config = config_lib.load_config("configs/scenes.py:tiny")
  return pipeline.run(config, "configs/scenes.py:tiny", workdir)   # Every stage done.


def _label_ids(ctx):
  return ctx.label_ids(only_mine=False)


def test_every_stage_writes_its_outputs(tiny_run):
  ctx = tiny_run
  ids = _label_ids(ctx)
  assert len(ids) == 16
  # The on-disk layout existing workdirs resume from (docs/design.md).
  for folder, suffix in (("cam_maps", ".npz"), ("crf", ".npz"), ("rw", ".png"),
                         ("rw_crf", ".png")):
    for image_id in ids:
      assert os.path.exists(os.path.join(ctx.workdir, folder, image_id + suffix)), folder
    # infer_rw writes both label folders and marks only rw/ finished.
    assert os.path.exists(os.path.join(ctx.workdir, folder, "DONE-0")) == (
        folder != "rw_crf"), folder
  for stage in ("cam", "aff", "seg"):
    assert os.path.isdir(os.path.join(ctx.workdir, stage, "ckpt", "4")), stage
    lines = open(os.path.join(ctx.workdir, stage, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
  for stage in pipeline.STAGES:
    assert stage.done(ctx), stage.name


def test_pseudo_masks_are_voc_palette_pngs_of_present_classes(tiny_run):
  ctx = tiny_run
  for image_id in _label_ids(ctx)[:4]:
    img = Image.open(ctx.files.rw.path(image_id))
    assert img.mode == "P"
    palette = np.array(img.getpalette()[:3 * 256]).reshape(256, 3)
    np.testing.assert_array_equal(palette, constants.voc_palette())
    label = np.asarray(img)
    example = ctx.example(image_id)
    assert label.shape == example["image"].shape[:2]
    allowed = {0} | set((np.flatnonzero(example["labels"]) + 1).tolist())
    assert set(np.unique(label).tolist()) <= allowed


def test_stored_cams_cover_present_classes_only(tiny_run):
  ctx = tiny_run
  image_id = _label_ids(ctx)[0]
  cams, keys = ctx.files.cams.load(image_id)
  example = ctx.example(image_id)
  np.testing.assert_array_equal(keys, np.flatnonzero(example["labels"]) + 1)
  assert cams.shape == example["image"].shape[:2] + (len(keys),)
  assert cams.min() >= 0 and cams.max() <= 1


def test_eval_reports(tiny_run):
  ctx = tiny_run
  results = json.load(open(ctx.files.reports.path("results.json")))
  methods = list(results["methods"])
  assert methods[0] == "CAM" and methods[1].startswith("CAM (best t=")
  assert methods[2:] == ["CAM+RW", "CAM+RW+dCRF", "seg (val)"]
  assert results["methods"][methods[1]]["miou"] >= results["methods"]["CAM"]["miou"]
  for method in results["methods"].values():
    assert 0 <= method["miou"] <= 100
  md = open(ctx.files.reports.path("results.md")).read()
  assert "| mIoU" in md
  for name in ("overlays.png", "confusion_cam.png", "confusion_cam_rw.png"):
    assert os.path.getsize(ctx.files.reports.path(name)) > 1000


def test_eval_runs_again_when_the_segmentation_net_is_enabled_after_it(tiny_run, tmp_path):
  # A workdir evaluated with seg.enabled False, then trained with it: eval must score
  # the net instead of keeping the report without it.
  with_seg = copy.deepcopy(tiny_run.config)
  without = copy.deepcopy(with_seg)
  without.seg.enabled = False
  assert with_seg.seg.enabled
  on, off = (common.Context(c, str(tmp_path), sharding.make_mesh()) for c in (with_seg, without))
  assert not evaluate.done(on) and not evaluate.done(off)
  os.makedirs(on.files.reports.directory)
  results = on.files.reports.path("results.json")
  for methods, done in ((["CAM", "CAM+RW"], False),
                        (["CAM", "CAM+RW", evaluate.seg_method(with_seg)], True)):
    json.dump({"methods": {m: {} for m in methods}}, open(results, "w"))
    assert evaluate.done(on) == done and evaluate.done(off)


def test_rerun_skips_finished_stages_and_redoes_lost_files(tiny_run, capsys):
  ctx = tiny_run
  ids = _label_ids(ctx)
  lost = [ctx.files.cams.path(ids[0]), ctx.files.rw.path(ids[1])]
  before = [open(p, "rb").read() for p in lost]
  for path in lost:
    os.remove(path)
  # A run killed inside these stages leaves no DONE marker.
  os.remove(os.path.join(ctx.workdir, "cam_maps", "DONE-0"))
  os.remove(os.path.join(ctx.workdir, "rw", "DONE-0"))
  pipeline.run(ctx.config, "configs/scenes.py:tiny", ctx.workdir)
  out = capsys.readouterr().out
  assert "[train_cam] done already" in out and "[infer_cam] running" in out
  assert "[train_aff] done already" in out and "[infer_rw] running" in out
  cams_before = np.load(io.BytesIO(before[0]))["cams"]
  np.testing.assert_array_equal(np.load(lost[0])["cams"], cams_before)
  np.testing.assert_array_equal(np.asarray(Image.open(lost[1])),
                                np.asarray(Image.open(io.BytesIO(before[1]))))


def _main(*args, cwd=REPO):
  result = subprocess.run([sys.executable, "-m", "affinity_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result


def test_workdir_of_another_config_is_refused(tiny_run):
  result = _main("--config=configs/scenes.py:tiny", f"--workdir={tiny_run.workdir}",
                 "--config.model.backbone=lite0")
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0
  assert result.stderr.startswith("error: workdir") and "model.backbone" in result.stderr


def test_unknown_config_key_is_one_line(tmp_path):
  result = _main("--config=configs/scenes.py:tiny", f"--workdir={tmp_path}",
                 "--config.cam.trian.lr=1")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: unknown config key cam.trian.lr; "
                                         "did you mean cam.train.lr")
  assert result.stderr.strip().count("\n") == 0


def test_missing_voc_folder_is_one_line(tmp_path):
  result = _main("--config=configs/voc12_lite0.py:tiny", f"--workdir={tmp_path}",
                 f"--config.data.manual_dir={tmp_path}/nowhere")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count("\n") == 0
  assert "nowhere" in result.stderr and "--config.data.manual_dir" in result.stderr


def test_half_prepared_dataset_is_one_line(tmp_path):
  from affinity_jax.data import sources
  builder = sources.prepare("scenes", str(tmp_path / "tfds"), image_size=64, num_train=16,
                            num_val=8)
  shard = builder.info.splits["train"].filepaths[0]
  os.remove(shard)
  result = _main("--config=configs/scenes.py:tiny", f"--workdir={tmp_path}",
                 "--mode=train_cam")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().count("\n") == 0
  assert os.fspath(shard) in result.stderr and "prepare it again" in result.stderr


def test_inference_before_training_says_what_to_run(tmp_path):
  config = config_lib.load_config("configs/scenes.py:tiny")
  with pytest.raises(UserError, match="--mode=train_cam"):
    pipeline.run(config, "configs/scenes.py:tiny", str(tmp_path), mode="infer_cam")


def test_aff_level_stages_on_a_backbone_without_them_is_one_line(tmp_path):
  config = config_lib.load_config("configs/scenes.py:tiny", {"aff.level_stages": "(2, 5)"})
  ctx = common.Context(config, str(tmp_path), sharding.make_mesh())
  with pytest.raises(UserError, match=r"backbone: bad options \{'level_stages': \(2, 5\)\} "
                     r"for 'tiny'"):
    ctx.make_model("aff", pretrained=False)


def test_voc_sample_end_to_end(voc_sample, tmp_path):
  # The tiny backbone keeps this fast; Lite0's ImageNet weights have tests of their own.
  config = config_lib.load_config("configs/voc12_lite0.py:tiny", {
      "data.manual_dir": voc_sample, "model.backbone": "tiny", "model.pretrained": "",
      "model.norm": "batch"})
  ctx = pipeline.run(config, "configs/voc12_lite0.py:tiny", str(tmp_path))
  results = json.load(open(ctx.files.reports.path("results.json")))
  assert len(results["methods"]) == 3 and "CAM+RW" in results["methods"]
  assert len(ctx.label_ids()) == 24


def test_voc_cpu_variant_end_to_end_keeps_the_frozen_layers_and_reports_label_quality(
    voc_tiny_workdir):
  # configs/voc12_lite0.py:cpu shrunk (cpu_tiny), on the tiny backbone (tests/voc_tiny.py):
  # the classifier's whole backbone and AffinityNet's layers below its last stage stay as
  # built; everything else trains. The ImageNet prior needs Lite0's ImageNet layer (a
  # later test, and test_models).
  _, config = workdir_layout.saved_config(voc_tiny_workdir)
  assert config.cam.frozen == ("backbone",) and config.aff.frozen == voc_tiny.AFF_FROZEN
  ctx = common.Context(config, voc_tiny_workdir, sharding.make_mesh())
  for kind, trains_in_backbone in (("cam", False), ("aff", True)):
    built, trained = ctx.make_model(kind, pretrained=False), ctx.trained_model(kind)
    before, after = nnx.state(built, nnx.Param), nnx.state(trained, nnx.Param)
    labels = optim.param_labels(before, ctx.frozen_prefixes(kind, built))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    names = [optim.path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(moved)]
    pairs = list(zip(names, jax.tree.leaves(labels), jax.tree.leaves(moved)))
    assert any(label == optim.FROZEN for _, label, _ in pairs), kind
    assert not [n for n, label, m in pairs if label == optim.FROZEN and m], kind
    assert any(m for n, label, m in pairs if not n.startswith("backbone/")), kind
    in_backbone = [m for n, label, m in pairs
                   if n.startswith("backbone/") and label != optim.FROZEN]
    assert any(in_backbone) == trains_in_backbone, kind
  results = json.load(open(ctx.files.reports.path("results.json")))
  quality = results["affinity_labels"]
  assert quality["images"] == 24 and 0 <= quality["label_map"]["coverage"] <= 1
  assert set(quality["pairs"]) == {"bg_pos", "fg_pos", "neg"}
  assert "Affinity labels against the true masks" in ctx.files.reports.markdown()


def test_voc_cpu_classifier_takes_the_packaged_imagenet_layer_for_its_prior(tmp_path):
  config = config_lib.load_config("configs/voc12_lite0.py:cpu_tiny")
  assert config.cam.imagenet_prior and config.model.pretrained == "imagenet"
  ctx = common.Context(config, str(tmp_path), sharding.make_mesh())
  model = ctx.make_model("cam")
  imagenet = build_backbone("lite0", rngs=nnx.Rngs(1), classifier=True)
  load.load_pretrained(imagenet, "imagenet", verbose=False)
  np.testing.assert_array_equal(model.backbone.fc.kernel.value, imagenet.fc.kernel.value)
  assert "backbone/fc" in ctx.frozen_prefixes("cam", model)


def test_voc_cpu_affinitynet_trains_lite0s_last_block_and_head_conv_only(tmp_path):
  # The backbone's trainable parameters under :cpu's aff.frozen, on an abstract Lite0.
  config = config_lib.load_config("configs/voc12_lite0.py:cpu")
  ctx = common.Context(config, str(tmp_path), sharding.make_mesh())
  model = nnx.eval_shape(lambda: ctx.make_model("aff", pretrained=False))
  labels = optim.param_labels(nnx.state(model, nnx.Param), ctx.frozen_prefixes("aff", model))
  trained = {optim.path_str(path).split("/")[1]
             for path, label in jax.tree_util.tree_leaves_with_path(labels)
             if optim.path_str(path).startswith("backbone/") and label != optim.FROZEN}
  assert trained == {"block15", "conv_head"}


def test_voc_cpu_full_segnet_trains_only_its_narrow_head(tmp_path):
  # :cpu_full's segmentation net on an abstract Lite0: a 128-channel LargeFOV head with
  # dilation 6 on a wholly frozen backbone, scored on val.
  config = config_lib.load_config("configs/voc12_lite0.py:cpu_full")
  assert config.seg.enabled and config.data.seg_eval_split == "val"
  ctx = common.Context(config, str(tmp_path), sharding.make_mesh())
  model = nnx.eval_shape(lambda: ctx.make_model("seg", pretrained=False))
  assert model.fc8.kernel.shape == (3, 3, 1280, 128) and model.fc8.kernel_dilation == 6
  labels = optim.param_labels(nnx.state(model, nnx.Param), ctx.frozen_prefixes("seg", model))
  trained = {optim.path_str(path).split("/")[0]
             for path, label in jax.tree_util.tree_leaves_with_path(labels)
             if label != optim.FROZEN}
  assert trained == {"fc8", "classifier"}


def test_walk_batches_pad_each_image_and_mask_the_rest():
  images = [np.ones((16, 24, 3), np.float32), 2 * np.ones((8, 8, 3), np.float32)]
  grids = [np.ones((2, 3, 2), np.float32), np.ones((1, 1, 3), np.float32)]
  x, grid, valid = walk.batch_inputs(images, grids, (64, 64))
  # Channels rounded up to the walk's 8 lanes (zeros), so class counts share a shape.
  assert x.shape == (2, 64, 64, 3) and grid.shape == (2, 8, 8, 8)
  assert not grid[..., 3:].any()
  assert x[0].sum() == 16 * 24 * 3 and x[1].sum() == 2 * 8 * 8 * 3
  assert grid[0].sum() == 2 * 3 * 2 and grid[1].sum() == 3
  np.testing.assert_array_equal(valid.sum(axis=(1, 2)), [6, 1])
  assert valid[0, :2, :3].all() and valid[1, 0, 0]


def test_walk_split_over_8_devices_equals_one_device():
  assert jax.device_count() == 8   # conftest.py
  rw = config_lib.load_config("configs/scenes.py:tiny").rw
  model = heads.AffinityNet("tiny", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = [rng.normal(size=s + (3,)).astype(np.float32) for s in ((32, 48), (24, 24))]
  grids = [rng.uniform(size=(s[0] // 8, s[1] // 8, 3)).astype(np.float32)
           for s in ((32, 48), (24, 24))]
  x, grid, valid = walk.batch_inputs(images, grids, (32, 48))
  walk1, state1 = walk.walker(model, rw)
  want, _ = walk1(state1, x, grid, valid)
  mesh = sharding.make_mesh()
  walk8, state8 = walk.walker(model, rw, mesh)
  padded = [sharding.pad_batch(a, 8) for a in (x, grid, valid)]
  assert padded[0].shape[0] == 8
  got, _ = walk8(state8, *padded)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got)[:2], np.asarray(want), atol=1e-5)
  assert not np.asarray(got)[2:].any()   # All-padding images stay zero.


def test_walk_class_normalize_gives_each_channel_a_peak_of_one():
  # A small object's walked score (peak 0.3) loses to the background's 0.4 beside it;
  # divided by its peak, as its CAM was, it wins where it is strongest.
  scores = np.zeros((2, 3, 2), np.float32)
  scores[..., 0] = 0.4
  scores[1, 0, 0], scores[0, 0, 1] = 0.9, 0.3
  scores[1, 2, 1] = 0.1
  np.testing.assert_array_equal(walk.normalize(scores, "none"), scores)
  out = walk.normalize(scores, "class")
  np.testing.assert_allclose(out.max(axis=(0, 1)), [1, 1], atol=1e-4)
  np.testing.assert_allclose(out[..., 1] * 0.3, scores[..., 1], rtol=1e-4)
  assert walk.labels(scores, np.array([7]))[0, 0] == 0
  assert walk.labels(out, np.array([7]))[0, 0] == 7
  with pytest.raises(UserError, match="rw.normalize: 'max' is not one of"):
    walk.normalize(scores, "max")


def test_walker_normalize_rescales_each_channel_of_each_image():
  rw = config_lib.load_config("configs/scenes.py:tiny").rw
  model = heads.AffinityNet("tiny", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in ((32, 48), (24, 40))]
  cams = [(rng.uniform(size=s + (2,)).astype(np.float32) * [1.0, 0.2], np.array([3, 9]))
          for s in ((32, 48), (24, 40))]
  plain = walk.Walker(model, rw)(images, cams)
  rw.normalize = "class"
  scaled = walk.Walker(model, rw)(images, cams)
  for p, s in zip(plain, scaled):
    ratio = p / s   # One factor per channel: the grid's peak, which bounds the pixels'.
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[0, 0], ratio.shape), rtol=1e-4)
    assert (s.max(axis=(0, 1)) <= 1 + 1e-5).all() and (s.max(axis=(0, 1)) > 0.8).all()
  rw.normalize = "max"
  with pytest.raises(UserError, match="rw.normalize: 'max' is not one of"):
    walk.Walker(model, rw)


class _CellMeans(nnx.Module):
  """A stand-in AffinityNet whose embedding is each 8x8 cell's mean colour."""

  def __call__(self, x, *, train):
    b, h, w, c = x.shape
    return x.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4)), {}


def test_walker_scales_embed_resized_images_on_the_unscaled_grid():
  # On a linear ramp every cell's mean is the ramp at the cell's centre, at any scale:
  # an embedding resized back onto the wrong cells (half a cell off) shows as an offset.
  rw = config_lib.load_config("configs/scenes.py:tiny").rw
  yy, xx = np.mgrid[:96, :128].astype(np.float32)
  x = np.stack([0.03 * xx, 0.05 * yy, 0.02 * (xx + yy)], -1)[None]
  cams = np.zeros((1, 12, 16, 8), np.float32)
  embeddings = {}
  for scales in [(1.0,), (2.0,), (1.5,), (0.5,), (1.0, 1.5, 2.0)]:
    rw.scales = scales
    fn, state = walk.walker(_CellMeans(), rw)
    _, embeddings[scales] = fn(state, jax.numpy.asarray(x), jax.numpy.asarray(cams))
    assert embeddings[scales].shape == (1, 12, 16, 3)
  base = np.asarray(embeddings[(1.0,)])
  np.testing.assert_allclose(base[0, 2, 3], [0.03 * 27.5, 0.05 * 19.5, 0.02 * 47], rtol=1e-5)
  for scales in [(2.0,), (1.5,), (1.0, 1.5, 2.0)]:   # Away from the clamped borders.
    np.testing.assert_allclose(np.asarray(embeddings[scales])[0, 1:-1, 1:-1],
                               base[0, 1:-1, 1:-1], atol=1e-4, err_msg=str(scales))
  # Shrunk 2x, each cell covers 2x2 of the grid; inside, the ramp is still exact.
  np.testing.assert_allclose(np.asarray(embeddings[(0.5,)])[0, 3:-3, 3:-3],
                             base[0, 3:-3, 3:-3], atol=1e-4)
  for bad in [(), (0.0,), (1.0, "x")]:
    rw.scales = bad
    with pytest.raises(UserError, match="rw.scales: .* expected one or more scales"):
      walk.walker(_CellMeans(), rw)


def test_walker_flip_averages_the_mirrored_embedding_and_commutes_with_mirroring():
  rw = config_lib.load_config("configs/scenes.py:tiny").rw
  model = heads.AffinityNet("tiny", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)   # Width: one 64-px bucket.
  cam = (rng.uniform(size=(32, 64, 2)).astype(np.float32), np.array([3, 9]))
  (_,), (plain,) = walk.Walker(model, rw)([image], [cam], embeddings=True)
  (_,), (mirrored,) = walk.Walker(model, rw)([image[:, ::-1]], [cam], embeddings=True)
  rw.flip = True
  walker = walk.Walker(model, rw)
  (scores,), (both,) = walker([image], [cam], embeddings=True)
  np.testing.assert_allclose(both, (plain + mirrored[:, ::-1]) / 2, atol=1e-5)
  assert np.abs(plain - mirrored[:, ::-1]).max() > 1e-3   # The mean is not trivial.
  # The mean of both is mirror symmetric, so mirroring the input mirrors the walk.
  (flipped,) = walker([image[:, ::-1]], [(cam[0][:, ::-1], cam[1])])
  np.testing.assert_allclose(flipped, scores[:, ::-1], atol=1e-4)
