"""Evaluation: accumulation over a split, the report files, and the pictures."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from affinity_jax import constants
from affinity_jax.evaluation import confusion, plots, report
from affinity_jax.ops import metrics
from affinity_jax.workdir import Workdir


def _split(seed, n=4, noise=0.2):
  """A lazy split: (pred, gt) pairs with gt from few classes and noisy predictions."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    gt = rng.choice([0, 0, 3, 15, 255], (10, 12)).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < noise, rng.choice([0, 3, 15, 7], gt.shape), gt)
    yield np.where(gt == 255, 0, pred).astype(np.uint8), gt


def test_accumulate_equals_one_big_matrix():
  pairs = list(_split(0))
  cm = confusion.accumulate(iter(pairs))
  big = metrics.confusion_np(np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs]))
  np.testing.assert_array_equal(cm, big)
  with pytest.raises(ValueError, match="shape"):
    confusion.accumulate([(np.zeros((2, 2)), np.zeros((2, 3)))])


def test_report_files_match_numbers(tmp_path, capsys):
  cms = confusion.evaluate({"CAM": _split(0, noise=0.5), "CAM+RW": _split(0, noise=0.1)})
  res = report.write(str(tmp_path), cms, only_present=True)
  printed = capsys.readouterr().out
  loaded = json.loads((tmp_path / "results.json").read_text())
  md = (tmp_path / "results.md").read_text()
  assert loaded == json.loads(json.dumps(res))
  for name, cm in cms.items():
    m = loaded["methods"][name]
    assert m["miou"] == pytest.approx(metrics.mean_iou(cm))
    assert m["iou"]["bird"] == pytest.approx(metrics.iou_per_class(cm)[3])
    assert m["iou"]["aeroplane"] is None
    assert m["confusion"] == cm.tolist()
  assert loaded["methods"]["CAM+RW"]["miou"] > loaded["methods"]["CAM"]["miou"]
  lines = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("|")}
  # Present classes only: background, bird, person and car (car only predicted: IoU 0).
  assert set(lines) - {"class", "-" * len(next(iter(lines)))} >= {"background", "bird",
                                                                   "person", "car", "mIoU"}
  assert "aeroplane" not in lines
  cells = [c.strip() for c in lines["mIoU"].split("|")[2:4]]
  assert cells == [f"{100 * loaded['methods'][m]['miou']:.1f}" for m in ("CAM", "CAM+RW")]
  assert lines["car"].split("|")[2].strip() == "0.0"
  assert "mIoU" in printed and sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
  full = report.table(res)
  assert "| aeroplane" in full and full.count("\n") == 21 + 2


def test_overlays_are_rgb_and_blend():
  image = np.full((6, 8, 3), 100, np.uint8)
  label = np.zeros((6, 8), np.uint8)
  label[:, 4:] = 15
  label[0, 0] = 255
  out = plots.label_overlay(image, label, alpha=0.5)
  assert out.shape == (6, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[1, 0], [100, 100, 100])  # background untouched
  np.testing.assert_array_equal(out[0, 5], np.rint((100 + np.array([192, 128, 128])) / 2))
  np.testing.assert_array_equal(out[0, 0], np.rint((100 + np.array([224, 224, 192])) / 2))
  cams = np.zeros((6, 8, 2), np.float32)
  cams[:3, :, 1] = 1.0
  heat = plots.cam_overlay(image, cams)
  assert heat.shape == (6, 8, 3) and heat.dtype == np.uint8
  assert not np.array_equal(heat[0, 0], heat[5, 0])  # hot vs cold
  with pytest.raises(ValueError):
    plots.cam_overlay(image, cams[:3])


def _rows(n=3, voc_sample=None):
  """Overlay rows: from the real sample's images when given, else generated."""
  if voc_sample:
    voc = os.path.join(voc_sample, "VOC2012")
    names = sorted(f[:-4] for f in os.listdir(f"{voc}/SegmentationClass"))[:n]
    for name in names:
      image = np.asarray(Image.open(f"{voc}/JPEGImages/{name}.jpg").convert("RGB"))
      gt = np.asarray(Image.open(f"{voc}/SegmentationClass/{name}.png"))
      fg = ((gt > 0) & (gt < 255)).astype(np.float32)
      cam = np.stack([np.roll(fg, 15, axis=1) * np.linspace(0.3, 1, gt.shape[1])], -1)
      pseudo = np.where(np.roll(fg, 10, axis=0) > 0, gt.max(where=gt < 255, initial=0), 0)
      yield {"image": image, "cam": cam, "pseudo": pseudo, "gt": gt, "title": name}
  else:
    rng = np.random.default_rng(0)
    for i in range(n):
      gt = np.zeros((40, 60), np.uint8)
      gt[10:30, 15 + i:45] = i + 1
      yield {"image": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
             "cam": rng.random((40, 60, 2)), "pseudo": gt, "gt": gt, "title": str(i)}


def test_plots_written_with_expected_size(tmp_path):
  cm = confusion.accumulate(_split(1))
  cpath = str(tmp_path / "confusion_CAM.png")
  plots.confusion_plot(cpath, cm, constants.LABEL_NAMES, size_in=6, dpi=80)
  assert Image.open(cpath).size == (480, 480)
  gpath = str(tmp_path / "overlays.png")
  rows = list(_rows(3))
  assert plots.overlay_grid(gpath, rows, cell_in=2.5, dpi=80) == 3
  aspect = max(r["image"].shape[0] / r["image"].shape[1] for r in rows)
  assert Image.open(gpath).size == (800, round((3 * 2.5 * aspect + 0.3) * 80))
  assert sorted(os.listdir(tmp_path)) == ["confusion_CAM.png", "overlays.png"]
  # With the post-walk dCRF labels the grid gets a fifth column.
  for row in rows:
    row["pseudo_crf"] = row["gt"]
  assert plots.overlay_grid(gpath, rows, cell_in=2.5, dpi=80) == 3
  assert Image.open(gpath).size[0] == 1000


def test_overlay_grid_of_real_photos(voc_sample, tmp_path):
  # Real photos differ in size and aspect: the grid's height follows the tallest.
  gpath = str(tmp_path / "overlays.png")
  rows = list(_rows(3, voc_sample))
  assert plots.overlay_grid(gpath, rows, cell_in=2.5, dpi=80) == 3
  aspect = max(r["image"].shape[0] / r["image"].shape[1] for r in rows)
  assert Image.open(gpath).size == (800, round((3 * 2.5 * aspect + 0.3) * 80))


def test_png_pairs_read_palette_pngs_lazily(tmp_path):
  from affinity_jax import io
  from affinity_jax.constants import voc_palette
  from affinity_jax.errors import UserError

  gts = {"a": np.array([[0, 15], [255, 3]], np.uint8), "b": np.array([[3, 3]], np.uint8)}
  io.save_png(str(tmp_path / "a.png"), np.array([[0, 15], [3, 3]], np.uint8), voc_palette())
  io.save_png(str(tmp_path / "b.png"), np.array([[3, 0]], np.uint8), voc_palette())
  cm = confusion.accumulate(confusion.png_pairs(["a", "b"], str(tmp_path), gts.__getitem__))
  assert cm[15, 15] == 1 and cm[3, 3] == 2 and cm[3, 0] == 1 and cm.sum() == 5
  with pytest.raises(UserError, match="c.png"):
    confusion.accumulate(confusion.png_pairs(["c"], str(tmp_path), gts.__getitem__))


def test_one_table_of_label_names():
  assert len(constants.LABEL_NAMES) == constants.NUM_LABELS
  assert constants.label_names("voc12") == constants.LABEL_NAMES
  assert constants.LABEL_NAMES[1] == "aeroplane" and constants.LABEL_NAMES[20] == "tvmonitor"
  scenes = constants.label_names("scenes")
  assert scenes[0] == "background" and scenes[1:3] == ("class 1", "class 2")
  assert len(scenes) == constants.NUM_LABELS


def _metrics_log(path, steps, lr=0.01, cut=True):
  lines = [json.dumps({"step": s, "loss": 2.0 / s, "lr": lr * (1 - (s - 1) / steps) ** 0.9,
                       "images_per_s": 10.0}) for s in range(1, steps + 1)]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n" + ('{"step": 9' if cut else ""))  # A killed writer.


def test_training_curves_png_from_metrics_logs(tmp_path):
  _metrics_log(str(tmp_path / "cam" / "metrics.jsonl"), 30)
  _metrics_log(str(tmp_path / "aff" / "metrics.jsonl"), 12, lr=0.1)
  path = str(tmp_path / "curves.png")
  logs = {name: str(tmp_path / name / "metrics.jsonl") for name in ("cam", "aff", "seg")}
  assert plots.training_curves(path, logs, cell_in=3, dpi=50) == ["cam", "aff"]
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (2 * round(3 * 0.7 * 50), 2 * 3 * 50, 3)
  assert (image != 255).any(axis=-1).mean() > 0.05  # Something was drawn.
  # No log at all: nothing drawn, nothing written.
  assert plots.training_curves(str(tmp_path / "none.png"), {"seg": logs["seg"]}) == []
  assert not os.path.exists(tmp_path / "none.png")


def test_report_links_the_training_curves_of_its_workdir(tmp_path):
  workdir = tmp_path / "run"
  _metrics_log(str(workdir / "cam" / "metrics.jsonl"), 20)
  _metrics_log(str(workdir / "seg" / "metrics.jsonl"), 20)
  out = str(workdir / "eval")
  report.write(out, {"CAM": confusion.accumulate(_split(0))}, echo=False,
               curves=Workdir(str(workdir)).training_logs())
  md = (workdir / "eval" / "results.md").read_text()
  assert "## Training curves" in md and "![training curves](training_curves.png)" in md
  assert "of cam, seg," in md
  assert Image.open(workdir / "eval" / "training_curves.png").size[0] > 0
  # A report given no training logs says nothing about curves.
  report.write(str(tmp_path / "alone"), {"CAM": confusion.accumulate(_split(0))}, echo=False)
  assert "Training curves" not in (tmp_path / "alone" / "results.md").read_text()
  assert not (tmp_path / "alone" / "training_curves.png").exists()


def test_cam_baselines_report_the_configured_and_the_best_threshold(capsys):
  rng = np.random.default_rng(0)
  gt = np.zeros((16, 16), np.uint8)
  gt[4:12, 4:12] = 3
  cams = np.zeros((16, 16, 20), np.float32)
  cams[..., 2] = np.where(gt == 3, 0.55, 0.35) + rng.uniform(-0.05, 0.05, (16, 16))
  pairs = [(cams, gt)] * 2
  out = confusion.cam_baselines(pairs, 0.15, (0.15, 0.45, 0.7))
  assert list(out) == ["CAM", "CAM (best t=0.45)"]
  expected = confusion.cam_thresholds(pairs, (0.15, 0.45))
  np.testing.assert_array_equal(out["CAM"], expected[0.15])
  np.testing.assert_array_equal(out["CAM (best t=0.45)"], expected[0.45])
  assert metrics.mean_iou(out["CAM (best t=0.45)"]) == 1.0
  assert "0.45: 100.0" in capsys.readouterr().out
  assert list(confusion.cam_baselines(pairs, 0.15)) == ["CAM"]


def test_cam_labels_equal_the_jax_op_and_compile_nothing():
  from affinity_jax import compilation
  from affinity_jax.ops import cam as cam_ops
  rng = np.random.default_rng(0)
  cams = rng.uniform(size=(2, 9, 13, 20)).astype(np.float32) ** 4
  cams[0, 0, 0, :] = 0.3                 # Ties with the background: background wins.
  cams[1, 0, 0, :] = 0.1
  cams[1, 0, 0, [4, 7]] = 0.9            # Ties between classes: the first one.
  for t in (0.1, 0.3, 0.6):
    want = np.asarray(cam_ops.cam_label_map(cams, t))
    with compilation.Compiles() as compiles:
      got = [confusion.cam_labels(c, t) for c in cams]
    np.testing.assert_array_equal(np.stack(got), want)
    assert compiles.count == 0
  assert want[1, 0, 0] == 5 and (want == 0).any() and (want > 0).any()
