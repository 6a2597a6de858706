"""Smoke tests of the benchmark scripts at tiny sizes: they run and write the JSON they
promise. No timing assertions (speed belongs in the scripts' own output)."""

import json
import math

import numpy as np
import pytest

from affinity_jax import defaults
from affinity_jax.benchmarks import affinity_loss
from affinity_jax.benchmarks import inputs
from affinity_jax.benchmarks import models as models_bench
from affinity_jax.benchmarks import pipeline
from affinity_jax.benchmarks import propagation

ROW_KEYS = {"stage", "variant", "batch", "images_per_s", "ms_per_image", "compile_s", "notes"}


def _row(stage, variant, img_s, batch=1):
  return dict(stage=stage, variant=variant, batch=batch, images_per_s=img_s,
              ms_per_image=1e3 / img_s, compile_s=None, notes="")


def test_pipeline_benchmark_writes_rows_and_verdict(tmp_path):
  out = tmp_path / "pipeline.json"
  # Batch 8: the train step splits the batch over conftest's 8 CPU devices.
  pipeline.main(["--backbone=tiny", "--crop=48", "--image=40x56", "--repeats=1",
                 "--stages=train_cam,crf,infer_rw", "--cam-batch=8", "--rw-batch=1",
                 "--crf-workers=1", f"--out={out}"])
  result = json.loads(out.read_text())
  assert result["backbone"] == "tiny" and result["image"] == [40, 56]
  rows = result["rows"]
  assert all(ROW_KEYS <= set(r) for r in rows)
  assert [r["stage"] for r in rows] == ["train_cam", "crf", "infer_rw", "infer_rw"]
  assert [r["variant"].startswith("dCRF") for r in rows] == [False, False, False, True]
  for r in rows:
    assert r["images_per_s"] > 0 and math.isclose(r["ms_per_image"] * r["images_per_s"], 1e3)
  assert {s["stage"] for s in result["summary"]} == {"train_cam", "crf", "infer_rw"}
  assert math.isclose(sum(s["share"] for s in result["summary"]), 1.0)
  assert result["bottleneck"] in {"train_cam", "crf", "infer_rw"}
  assert {"total_hours", "rw_share", "crf_share", "rw_or_crf_is_bottleneck"} <= set(result)


def test_pipeline_benchmark_infer_cam_row_has_the_forwards_and_ratios(tmp_path):
  out = tmp_path / "pipeline.json"
  pipeline.main(["--backbone=tiny", "--image=40x56", "--repeats=1", "--stages=infer_cam",
                 f"--out={out}"])
  (row,) = json.loads(out.read_text())["rows"]
  assert ROW_KEYS <= set(row) and row["stage"] == "infer_cam"
  assert row["forwards_ms_per_image"] > 0 and row["forwards_cpu_ms_per_image"] > 0
  assert math.isclose(row["ratio_wall"], row["ms_per_image"] / row["forwards_ms_per_image"])
  assert math.isclose(row["ratio_cpu"],
                      row["cpu_ms_per_image"] / row["forwards_cpu_ms_per_image"])


def test_pipeline_summary_uses_the_pools():
  rows = [_row("train_cam", "448x448 crops, sgd", 100.0, batch=16),
          _row("crf", "375x500, 2+1 labels, 1 process", 1.0),
          _row("crf", "run_pool, 4 workers, end to end", 2.0, batch=16),
          _row("crf", "run_pool, 4 workers, steady state", 4.0),
          _row("infer_rw", "forward + walk", 20.0),
          _row("infer_rw", "forward + walk", 40.0, batch=4),
          _row("infer_rw", "dCRF after the walk", 5.0)]
  summ = {s["stage"]: s for s in pipeline.summary(rows)}
  assert math.isclose(summ["crf"]["images_per_s"], 4.0)   # Steady state, not 1 process.
  # The walk's CRFs run in crf.num_workers (2) processes alongside the walk.
  assert defaults.base_config().crf.num_workers == 2
  assert math.isclose(summ["infer_rw"]["images_per_s"], 1 / max(1 / 40, 1 / 5 / 2))
  assert math.isclose(summ["crf"]["hours"], pipeline.TRAIN_AUG / 4.0 / 3600)
  verdict = pipeline.verdict(list(summ.values()))
  # train_cam: 158,720 images at 100/s = 0.44 h; crf 10,582 at 4/s = 0.73 h.
  assert verdict["bottleneck"] == "crf" and verdict["rw_or_crf_is_bottleneck"]


def test_propagation_benchmark_agrees_with_dense(tmp_path):
  out = tmp_path / "propagation.json"
  propagation.main(["--sizes", "10x12", "--repeats", "1", "--batch", "1", "--dim", "4",
                    "--out", str(out)])
  result = json.loads(out.read_text())
  methods = [r["method"] for r in result["rows"]]
  assert methods == ["dense NumPy", "dense JAX", "banded JAX", "banded JAX"]
  for r in result["rows"]:
    assert r["grid"] == "10x12" and r["images_per_s"] > 0
    assert r["max_abs_diff_vs_dense_numpy"] < 1e-4
    assert r["max_abs_diff_batch_vs_single"] < 1e-5


def test_propagation_benchmark_banded_only(tmp_path):
  out = tmp_path / "banded.json"
  propagation.main(["--sizes", "10x12", "--repeats", "1", "--batch", "2", "--dim", "4",
                    "--methods", "banded", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [(r["method"], r["batch"]) for r in rows] == [("banded JAX", 1), ("banded JAX", 2)]
  assert all(r["speedup_vs_dense_jax"] is None and r["extra_mb"] >= 0 for r in rows)
  assert rows[1]["max_abs_diff_batch_vs_single"] < 1e-5


def test_models_benchmark_writes_rows(tmp_path):
  out = tmp_path / "models.json"
  models_bench.main(["--backbones=tiny", "--size=32", "--batch=1", "--iters=1",
                     f"--out={out}"])
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  assert row["backbone"] == "tiny" and row["size"] == 32 and row["params_M"] > 0
  assert row["forward_img_s"] > 0 and row["train_img_s"] > 0
  assert row["step_in_forwards"] == pytest.approx(row["forward_img_s"] / row["train_img_s"],
                                                  rel=0.02, abs=0.01)


def test_affinity_loss_benchmark_rows_and_matching_gradients(tmp_path):
  out = tmp_path / "affinity_loss.json"
  affinity_loss.main(["--grids", "6x7", "--batch=2", "--dim=4", "--radii=2,12",
                      "--repeats=1", f"--out={out}"])
  rows = json.loads(out.read_text())["rows"]
  assert [(r["grid"], r["radius"]) for r in rows] == [("6x7", 2), ("6x7", 12)]
  for r in rows:
    assert r["forward_ms"] > 0 and r["grad_ms"] > 0 and r["grad_autodiff_ms"] > 0
    assert r["max_abs_diff"] < 1e-5


def test_propagation_benchmark_dense_jax_memory_only_above_the_limit(tmp_path):
  out = tmp_path / "limit.json"
  propagation.main(["--sizes", "10x12", "--repeats", "1", "--batch", "2", "--dim", "4",
                    "--methods", "dense_jax,banded", "--dense-jax-max-nodes", "100",
                    "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["method"] for r in rows] == ["banded JAX", "banded JAX"]
  assert all(r["speedup_vs_dense_jax"] is None for r in rows)
  assert all(r["extra_memory_vs_dense_jax"] > 0 for r in rows)   # From the compile alone.


def test_propagation_figure_and_table():
  rows = []
  for nodes, grid in ((64, "8x8"), (256, "16x16")):
    for method, batch, ms in (("dense JAX", 1, nodes ** 1.5), ("banded JAX", 1, nodes * 0.1),
                              ("banded JAX", 4, nodes * 0.05)):
      rows.append(dict(grid=grid, nodes=nodes, method=method, batch=batch, ms_per_image=ms,
                       peak_mb=nodes / 100, speedup_vs_dense_jax=1.0,
                       max_abs_diff_vs_dense_numpy=0.0))
  fig = propagation.figure(rows, title="test")
  time_ax, mem_ax = fig.axes
  assert time_ax.get_xscale() == "log" and mem_ax.get_yscale() == "log"
  labels = [line.get_label() for line in time_ax.get_lines()]
  assert labels == ["dense JAX", "banded JAX", "banded JAX (batch 4)"]
  np.testing.assert_allclose(time_ax.get_lines()[0].get_ydata(), [64 ** 1.5, 256 ** 1.5])
  table = propagation.markdown(rows)
  assert table.count("\n") == 2 + len(rows)


def test_inputs_benchmark_rates_and_cores(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(50, 70), (66, 40), (48, 48)]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(tmp_path / f"im{i}.jpg")
  out = tmp_path / "inputs.json"
  inputs.main(["--images", str(tmp_path), "--crop", "64", "--repeats", "1",
               "--step-rates", "1,1000000", "--out", str(out)])
  result = json.loads(out.read_text())
  assert [r["pipeline"] for r in result["rows"]] == list(inputs.PIPELINES)
  for r in result["rows"]:
    assert r["images"] == 3 and r["crop"] == 64 and r["images_per_s_cpu"] > 0
    assert math.isclose(r["ms_per_image_wall"] * r["images_per_s_wall"], 1e3)
  cores = {(c["pipeline"], c["step_images_per_s"]): c for c in result["cores"]}
  assert cores["affinity", 1.0]["workers"] == 1 and cores["affinity", 1.0]["cores"] == 2
  rate = {r["pipeline"]: r["images_per_s_cpu"] for r in result["rows"]}
  assert cores["classification", 1e6]["workers"] == math.ceil(1e6 / rate["classification"])
  assert result["cpus"] >= 1 and result["default_workers"] >= 0


def test_workers_needed_rounds_up():
  assert inputs.workers_needed(50, 25) == 2 and inputs.workers_needed(51, 25) == 3


def test_rehearsal_projects_every_stage(tmp_path, monkeypatch):
  from affinity_jax.benchmarks import rehearsal
  from affinity_jax.inference import canvas
  base_config = defaults.base_config

  def small_config():   # The paper's config with cheaper inference (the canvases kept).
    c = base_config()
    c.cam.scales, c.cam.infer_batch = (1.0, 0.5), 1
    c.rw.t, c.rw.batch_size = 8, 1
    return c

  monkeypatch.setattr(defaults, "base_config", small_config)
  out = tmp_path / "rehearsal.json"
  # Batch 8: the train steps split the batch over conftest's 8 CPU devices. Two images:
  # one per canvas.
  rehearsal.main(["--backbone=tiny", "--images=2", "--steps=1", "--crf-images=3",
                  "--train-batch=8", "--crop=64", "--workers=0", f"--out={out}"])
  result = json.loads(out.read_text())
  rows = {r["stage"]: r for r in result["rows"]}
  assert list(rows) == list(rehearsal.STAGES)
  c = small_config()
  canvases = canvas.Canvases.from_config(c.data)
  used = {canvases.canvas(h, w) for h, w in result["sizes"]}
  assert len(used) == len(canvases.sizes) == rows["infer_cam"]["canvases_used"]
  # One network program per canvas and scale, and nothing else: batches go straight to
  # conftest's 8 devices.
  assert rows["infer_cam"]["programs_by_name"] == {
      "jit(forward)": len(used) * len(c.cam.scales)}
  assert rows["aff_labels"]["programs"] == 0
  assert 0 <= rows["train_cam"]["host_wait"] <= 1
  for r in rows.values():
    assert r["images_per_s"] > 0 and r["projected_min"] > 0 and r["peak_host_mb"] > 0
  total = result["projected_total_min"]
  assert math.isfinite(total) and total > 0
  assert math.isclose(total, sum(r["projected_min"] for r in rows.values()))


def test_rehearsal_draws_every_canvas():
  from affinity_jax.benchmarks import rehearsal
  from affinity_jax.benchmarks import voc_sizes
  from affinity_jax.inference import canvas
  canvases = canvas.Canvases.from_config(defaults.base_config().data)
  assert sum(n for *_, n in voc_sizes.SIZES) == 316 and voc_sizes.SIZES[0] == (375, 500, 132)
  sizes = rehearsal.draw_sizes(2, 0, canvases)
  assert {canvases.canvas(*s) for s in sizes} == set(canvases.sizes)
  assert rehearsal.draw_sizes(20, 3, canvases) == rehearsal.draw_sizes(20, 3, canvases)
