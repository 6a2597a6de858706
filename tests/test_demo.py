"""affinity_jax.demo on the tiny scenes pipeline (the session's `tiny_workdir`, see
conftest.py): panel names, shapes and value ranges, figures, benchmark plot."""

import numpy as np
import pytest

from affinity_jax import constants
from affinity_jax import demo
from affinity_jax.errors import UserError

TINY = "configs/scenes.py:tiny"


@pytest.fixture(scope="module")
def ctx(tiny_workdir):
  return demo.run_pipeline(TINY, tiny_workdir)   # Every stage done: only opens it.


def _check_images(panels, size):
  for name, im in panels.images.items():
    assert im.dtype == np.uint8, name
    assert im.shape == size + (3,), name


def test_explain_panels(ctx):
  ids = demo.image_ids(ctx)
  assert ids
  example = ctx.example(ids[0])
  panels = demo.explain(ctx, ids[0])
  assert list(panels.images) == [
      "image", "CAM", "background score", "affinity labels", "learned affinities (edges)",
      "random walk", "pseudo label (RW)", "pseudo label (RW+dCRF)", "ground truth"]
  _check_images(panels, example["image"].shape[:2])
  np.testing.assert_array_equal(panels.images["image"], example["image"])
  assert panels.title.startswith(ids[0])
  # Overlays differ from the plain image somewhere (the heat map covers every pixel).
  assert np.any(panels.images["CAM"] != example["image"])


def test_affinity_label_map_values(ctx):
  image_id = demo.image_ids(ctx)[0]
  label = demo.affinity_label_map(ctx, image_id)
  assert label.shape == ctx.example(image_id)["image"].shape[:2]
  keys = set(np.flatnonzero(ctx.example(image_id)["labels"]) + 1)
  assert set(np.unique(label)) <= keys | {0, constants.IGNORE}
  # Constant on every 8 x 8 cell: the 1/8 map repeated.
  assert np.all(label[::8, ::8].repeat(8, 0).repeat(8, 1)[:label.shape[0], :label.shape[1]]
                == label)


def test_walk_edges_and_scores(ctx):
  image_id = demo.image_ids(ctx)[1]
  image = ctx.example(image_id)["image"]
  cams, keys = ctx.files.cams.load(image_id)
  edges, scores = demo._walk(ctx, image, cams, keys)
  assert edges.shape == image.shape[:2]
  assert 0 <= edges.min() and edges.max() <= 1
  assert scores.shape == image.shape[:2] + (len(keys) + 1,)
  assert np.all(np.isfinite(scores))


def test_panels_are_the_stages_outputs(ctx):
  # The demo runs the stages' own inference (same padding, batching and devices), so
  # its walk labels and CAMs equal what infer_rw and infer_cam stored, exactly.
  for image_id in demo.image_ids(ctx)[:4]:
    example = ctx.example(image_id)
    image = example["image"]
    cams, keys = ctx.files.cams.load(image_id)
    stored = ctx.files.rw.load(image_id)
    panels, walk_labels = demo._common_panels(ctx, image, cams, keys)
    np.testing.assert_array_equal(walk_labels, stored)
    recomputed = demo._classifier(ctx).cams([example])[0][..., keys - 1]
    np.testing.assert_array_equal(recomputed.astype(np.float16).astype(np.float32), cams)
    explained = demo.explain(ctx, image_id).images
    np.testing.assert_array_equal(explained["pseudo label (RW)"],
                                  demo.plots.label_overlay(image, stored))
    np.testing.assert_array_equal(explained["pseudo label (RW+dCRF)"],
                                  demo.plots.label_overlay(image, ctx.files.rw_crf.load(image_id)))
    for name in ("CAM", "background score", "learned affinities (edges)", "random walk"):
      np.testing.assert_array_equal(explained[name], panels[name])


def test_predict_image(ctx):
  image = demo.new_scene(ctx, seed=777)
  assert image.shape == (ctx.config.data.scenes.image_size,) * 2 + (3,)
  panels = demo.predict_image(ctx, image, title="new")
  assert list(panels.images) == ["image", "CAM", "background score",
                                 "learned affinities (edges)", "random walk",
                                 "pseudo label (RW)", "segmentation net"]
  _check_images(panels, image.shape[:2])
  assert panels.title.startswith("new: ")
  # A non-square, non-multiple-of-8 RGBA float image works too.
  odd = np.random.default_rng(0).uniform(size=(37, 53, 4))
  _check_images(demo.predict_image(ctx, odd), (37, 53))


def test_classify_picks_at_least_one_class(ctx):
  keys, cams = demo.classify(ctx, demo.new_scene(ctx, seed=5))
  assert len(keys) >= 1 and np.all((keys >= 1) & (keys <= 20))
  assert cams.shape == (64, 64, len(keys))
  assert cams.min() >= 0 and cams.max() < 1


def test_show_and_save(ctx, tmp_path):
  ids = demo.image_ids(ctx)[:2]
  rows = [demo.explain(ctx, i) for i in ids]
  fig = demo.show(rows)
  assert len(fig.axes) == 2 * len(rows[0].images)
  assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "CAM", "background score"]
  path = str(tmp_path / "panels.png")
  demo.save_figure(fig, path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_open_workdir(ctx, tiny_workdir):
  opened = demo.open_workdir(tiny_workdir)
  assert opened.config.cam.scales == ctx.config.cam.scales
  assert opened.config.rw.t == ctx.config.rw.t
  assert "mIoU" in demo.results_markdown(opened)
  only_read = demo.open_workdir(tiny_workdir, run=False)
  assert only_read.config.to_dict() == opened.config.to_dict()


def test_open_workdir_errors(tmp_path):
  with pytest.raises(UserError, match="config.json"):
    demo.open_workdir(str(tmp_path))


def test_as_rgb():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(demo.as_rgb(grey)[..., 2], grey)
  assert demo.as_rgb(np.ones((2, 2, 3))).max() == 255
  with pytest.raises(UserError, match="image"):
    demo.as_rgb(np.zeros((2, 2, 5)))
