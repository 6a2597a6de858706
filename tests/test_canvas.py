"""Inference on fixed canvases: which canvas an image takes, and programs compiled.

Images of many sizes must compile one network program per canvas (and scale), none
per image size; the inference stages on 8 devices store what 1 device stores.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import voc_tiny

from affinity_jax import compilation
from affinity_jax import config_lib
from affinity_jax import sharding
from affinity_jax.errors import UserError
from affinity_jax.inference import cam as cam_inference
from affinity_jax.inference import canvas
from affinity_jax.inference import segment
from affinity_jax.inference import walk
from affinity_jax.models import heads
from affinity_jax.stages import cam as cam_stage
from affinity_jax.stages import common
from affinity_jax.stages import random_walk as rw_stage

CANVASES = canvas.Canvases(((48, 48), (32, 48)), multiple=16)
# Sizes on both canvases (landscape up to 32 x 48, anything else up to 48 x 48).
SIZES = [(32, 48), (17, 40), (25, 33), (9, 12), (48, 48), (40, 24), (33, 48), (47, 21),
         (31, 47), (48, 9)]


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in sizes]


def test_an_image_takes_the_smallest_canvas_that_holds_it():
  assert CANVASES.sizes == ((32, 48), (48, 48))          # Smallest area first.
  assert CANVASES.canvas(32, 48) == CANVASES.canvas(1, 1) == (32, 48)
  assert CANVASES.canvas(33, 10) == CANVASES.canvas(48, 48) == (48, 48)
  # Beyond every canvas: tight padding to `multiple`.
  assert CANVASES.canvas(49, 20) == (64, 32)
  # Scaled: the canvas scaled and rounded up to the stride, or the tight size.
  assert CANVASES.at_scale(20, 30, 0.5) == (16, 24)
  assert CANVASES.at_scale(20, 30, 1.5) == (48, 72)
  assert CANVASES.at_scale(40, 30, 0.75) == (40, 40)     # 48 * 0.75 = 36 -> 40.
  assert CANVASES.at_scale(49, 20, 0.5) == (32, 16)      # round(24.5) = 24 -> 32.
  tight = canvas.Canvases((), 64)
  assert tight.canvas(375, 500) == (384, 512) and tight.at_scale(375, 500, 0.5) == (192, 256)
  # A scaled canvas holds every image it takes, scaled as ops.cam.pass_plan rounds.
  for h, w in SIZES:
    for s in (0.5, 1.0, 1.5, 2.0):
      ch, cw = CANVASES.at_scale(h, w, s)
      assert round(h * s) <= ch and round(w * s) <= cw and ch % 8 == 0 and cw % 8 == 0


def test_malformed_canvases_are_one_line_errors():
  config = config_lib.load_config("configs/voc12_lite0.py:tiny")
  assert canvas.Canvases.from_config(config.data).sizes == ((384, 512), (512, 512))
  for bad in ["((384, 500),)", "((0, 64),)", "(64,)"]:
    config = config_lib.load_config("configs/voc12_lite0.py:tiny",
                                    {"data.infer_canvases": bad})
    with pytest.raises(UserError, match=r"^data\.infer_canvases: "):
      canvas.Canvases.from_config(config.data)


def test_cams_of_many_sizes_compile_one_program_per_canvas_and_scale():
  model = heads.CAMNet("tiny", rngs=nnx.Rngs(0))
  scales = (1.0, 0.5)
  classifier = cam_inference.Classifier(model, scales, CANVASES, batch_size=3)
  labels = np.zeros(20, np.uint8)
  labels[[2, 11]] = 1
  examples = [dict(image=image, labels=labels) for image in _images(SIZES)]
  with compilation.Compiles() as compiles:
    cams = classifier.cams(examples)
  assert compiles.count == len(CANVASES.sizes) * len(scales), compiles.by_name
  assert [c.shape[:2] for c in cams] == SIZES
  with compilation.Compiles() as again:
    classifier.cams([dict(image=image, labels=labels) for image in _images(
        [(20, 20), (45, 30), (31, 7)], seed=1)])
  assert again.count == 0, again.by_name
  # On a canvas, each image's CAMs are those it gets alone on the same canvas.
  forward, state = cam_inference.classifier_forward(model)
  for example, got in list(zip(examples, cams))[:3]:
    want = cam_inference.multiscale_cams(forward, state, example,
                                         model.backbone.normalization, scales, CANVASES)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_walks_and_segmentations_of_new_sizes_compile_nothing():
  rw = config_lib.load_config("configs/scenes.py:tiny").rw
  rw.batch_size = 3
  walker = walk.Walker(heads.AffinityNet("tiny", rngs=nnx.Rngs(0)), rw, CANVASES)
  rng = np.random.default_rng(0)

  def run(sizes, seed):
    cams = [(rng.uniform(size=s + (2,)).astype(np.float32), np.array([3, 9])) for s in sizes]
    with compilation.Compiles() as compiles:
      scores = walker(_images(sizes, seed), cams)
    assert [s.shape for s in scores] == [s + (3,) for s in sizes]
    return compiles

  first = run(SIZES, 0)
  assert first.count > 0
  assert run([(20, 20), (45, 30), (31, 7), (32, 40)], 1).count == 0
  predict = segment.predictor(heads.SegNet("tiny", rngs=nnx.Rngs(0), dilation=2), CANVASES)
  with compilation.Compiles() as compiles:
    for image in _images(SIZES):
      assert predict(image).shape == image.shape[:2]
  assert compiles.count == len(CANVASES.sizes), compiles.by_name


def test_inference_stages_on_8_devices_store_what_1_device_stores(voc_tiny_workdir,
                                                                   tmp_path):
  # voc_tiny_workdir ran on all 8 local devices; rerun both inference stages on 8 and on
  # one, each in a copy of it.
  assert jax.local_device_count() == 8   # conftest.py
  config = config_lib.load_config(voc_tiny.CONFIG, dict(
      voc_tiny.OVERRIDES, **{"data.infer_canvases": "((384, 512), (512, 512))"}))
  runs = {}
  for devices in (8, 1):
    workdir = str(tmp_path / f"devices_{devices}")
    shutil.copytree(voc_tiny_workdir, workdir)
    ctx = common.Context(config, workdir, sharding.make_mesh())
    ctx.local_mesh = sharding.make_mesh(jax.local_devices()[:devices])
    for store in (ctx.files.cams, ctx.files.rw):
      shutil.rmtree(store.directory)
    with compilation.Compiles() as compiles:
      cam_stage.infer(ctx)
    canvases_used = {ctx.canvases.canvas(*ctx.example(i)["image"].shape[:2])
                     for i in ctx.label_ids()}
    # The network's programs only: batches go straight to their devices.
    assert compiles.by_name == {"jit(forward)": len(canvases_used) * len(config.cam.scales)}
    rw_stage.infer(ctx)
    runs[devices] = ctx
  ctx, eight = runs[1], runs[8]
  ids = ctx.label_ids()
  assert len(ids) > 10 and len({ctx.example(i)["image"].shape for i in ids}) > 3
  for image_id in ids:
    one_cams, one_keys = ctx.files.cams.load(image_id)
    cams, keys = eight.files.cams.load(image_id)
    np.testing.assert_array_equal(one_keys, keys)
    np.testing.assert_allclose(one_cams, cams, atol=1e-4)
  same = [np.mean(ctx.files.rw.load(i) == eight.files.rw.load(i)) for i in ids]
  assert min(same) >= 0.999, min(same)


def test_exact_runs_every_image_and_scale_at_its_own_size():
  """`data.infer_pad=0` (psa's way, `:from_reference`): nothing padded."""
  exact = canvas.Canvases((), 0)
  assert exact.exact and not canvas.Canvases().exact
  assert exact.canvas(75, 100) == (75, 100)
  assert exact.at_scale(75, 100, 0.5) == (38, 50) and exact.at_scale(75, 100, 1.5) == (112, 150)
  with pytest.raises(UserError, match=r"data\.infer_pad: 0; .* or 0 \(no padding\) with "
                                      r"data\.infer_canvases=\(\)"):
    canvas.Canvases(((384, 512),), 0)
