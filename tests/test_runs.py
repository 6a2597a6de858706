"""Runs that cannot collide or be lost: one run per workdir, stops on SIGTERM that keep
the work, one-line errors for a full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from affinity_jax import config_lib
from affinity_jax import stopping
from affinity_jax import workdir
from affinity_jax.stages import pipeline
from affinity_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/scenes.py:tiny"


def _snapshot(root: str) -> dict:
  """Every file under `root` but the lock (the test's own hold writes it): its size and
  modification time."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      if folder == root and name == workdir.LOCK:
        continue
      stat = os.stat(os.path.join(folder, name))
      out[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size,
                                                                stat.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def finished(tiny_workdir, tmp_path_factory):
  """A copy of the session's finished tiny run."""
  root = str(tmp_path_factory.mktemp("runs") / "tiny")
  shutil.copytree(tiny_workdir, root)
  return root


def test_a_second_run_is_refused_at_once_and_writes_nothing(finished):
  before = _snapshot(finished)
  with workdir.lock(finished):   # A run in progress.
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "affinity_jax.main", f"--config={TINY}",
                             f"--workdir={finished}"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.perf_counter() - start
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith(f"error: workdir {finished} is in use by another run "
                                  f"(host {os.uname().nodename}, pid {os.getpid()}, since ")
  assert elapsed < 5, elapsed
  assert _snapshot(finished) == before


def test_eval_reads_a_workdir_in_use_without_writing_it(finished, capsys):
  config = config_lib.load_config(TINY)
  before = _snapshot(finished)
  with workdir.lock(finished):
    ctx = pipeline.run(config, TINY, finished, mode="eval")
  out = capsys.readouterr().out
  assert f"note: workdir {finished} is in use by another run" in out
  assert "reading it only" in out and "| mIoU" in out
  assert _snapshot(finished) == before
  assert not ctx.files.reports.directory.startswith(finished)
  ours = json.load(open(ctx.files.reports.path("results.json")))
  theirs = json.load(open(os.path.join(finished, "eval", "results.json")))
  assert ours["methods"] == theirs["methods"]
  shutil.rmtree(ctx.files.reports.directory)


# --------------------------------------------------------------------------- SIGTERM


def _signal_at_step(monkeypatch, kind: str, step: int) -> None:
  """SIGTERM to this process while training network `kind` fetches the batch after
  `step` (so during step `step` + 1)."""
  real = loop._next_batch

  def next_batch(batches, at, steps, folder):
    if at == step and os.path.basename(folder) == kind:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(batches, at, steps, folder)
  monkeypatch.setattr(loop, "_next_batch", next_batch)


def _signal_at_image(monkeypatch, count: int) -> None:
  """SIGTERM to this process as infer_cam stores its `count`-th image."""
  real, saved = workdir.CamStore.save, []

  def save(self, *args):
    real(self, *args)
    saved.append(args[0])
    if len(saved) == count:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(workdir.CamStore, "save", save)


def _steps(root: str, kind: str) -> tuple[list[int], list[int]]:
  """(checkpoint steps, steps of metrics.jsonl) of network `kind`."""
  ckpts = sorted(int(n) for n in os.listdir(os.path.join(root, kind, "ckpt")) if n.isdigit())
  rows = open(os.path.join(root, kind, "metrics.jsonl")).read().splitlines()
  return ckpts, [json.loads(r)["step"] for r in rows]


def test_sigterm_keeps_the_work_and_the_rerun_gives_the_uninterrupted_table(
    tiny_workdir, tmp_path, monkeypatch, capsys):
  root = str(tmp_path / "stopped")
  # Checkpoints at the end only: a stop saves the step of the signal, no periodic one.
  # No segmentation net (its training is the loop already tested twice here).
  config = config_lib.load_config(TINY, {"cam.train.ckpt_every": "100",
                                         "aff.train.ckpt_every": "100",
                                         "seg.enabled": "false"})

  def run_until_stopped(code=143):
    with pytest.raises(stopping.Stopped) as e:
      pipeline.run(config, TINY, root)
    assert e.value.code == code
    return str(e.value)

  _signal_at_step(monkeypatch, "cam", 2)
  message = run_until_stopped()
  assert message.startswith("stopped by SIGTERM at step 3 of 4, after saving checkpoint "
                            f"{os.path.join(root, 'cam', 'ckpt', '3')}; run the same "
                            "command again to resume")
  assert _steps(root, "cam") == ([3], [1, 2, 3])
  assert "[train_cam] stopped after" in capsys.readouterr().out
  monkeypatch.undo()

  _signal_at_image(monkeypatch, 5)
  message = run_until_stopped()
  assert message.startswith("stopped by SIGTERM in infer_cam, 5 of 16 images stored")
  assert _steps(root, "cam") == ([3, 4], [1, 2, 3, 4])
  stored = os.listdir(os.path.join(root, "cam_maps"))
  assert len(stored) == 5 and all(n.endswith(".npz") for n in stored)   # No DONE marker.
  monkeypatch.undo()

  _signal_at_step(monkeypatch, "aff", 1)
  run_until_stopped()
  assert _steps(root, "aff") == ([2], [1, 2])
  monkeypatch.undo()

  pipeline.run(config, TINY, root)
  for kind in ("cam", "aff"):
    assert _steps(root, kind)[1] == [1, 2, 3, 4]
  ours = json.load(open(os.path.join(root, "eval", "results.json")))
  theirs = json.load(open(os.path.join(tiny_workdir, "eval", "results.json")))
  del theirs["methods"]["seg (val)"]
  assert ours == theirs
