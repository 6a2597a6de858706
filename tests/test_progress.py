"""Progress displays: a live bar on a terminal or in a notebook, timed plain lines elsewhere."""

import io
import sys
import types

import numpy as np
import pytest

from affinity_jax import progress
from affinity_jax.evaluation import confusion


class FakeClock:

  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


class Terminal(io.StringIO):

  def isatty(self):
    return True


@pytest.fixture
def clock(monkeypatch):
  fake = FakeClock()
  monkeypatch.setattr(progress, "_clock", fake)
  return fake


def test_plain_lines_at_the_interval_with_rate_elapsed_and_eta(clock):
  out = io.StringIO()
  with progress.Progress(total=100, desc="dense CRF", unit="img", every_s=10, file=out) as bar:
    assert out.getvalue() == "dense CRF: 0/100 (0%), 0 img/s, elapsed 0:00\n"
    for _ in range(25):  # 2 images a second.
      clock.t += 0.5
      bar.update(1)
  lines = out.getvalue().splitlines()
  # The start, one line per 10 s (at 20 images), and the end.
  assert lines[1:] == [
      "dense CRF: 20/100 (20%), 2 img/s, elapsed 0:10, ETA 0:40",
      "dense CRF: 25/100 (25%), 2 img/s, elapsed 0:12, ETA 0:38",
  ]
  assert "\r" not in out.getvalue()


def test_training_fields_and_a_resumed_count(clock):
  out = io.StringIO()
  bar = progress.Progress(total=600, initial=100, desc="aff", unit="step", every_s=30,
                          file=out)
  for step in range(101, 161):
    clock.t += 1.0
    bar.set_postfix(loss=f"{1 / step:.4f}", lr="9.10e-03", img_s="12.9")
    bar.update(1)
  bar.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("aff: 100/600 (17%)")
  # Rate and ETA count only this run's steps (1 step/s), not the resumed 100.
  assert lines[1] == ("aff: 130/600 (22%), 1 step/s, loss=0.0077, lr=9.10e-03, img_s=12.9, "
                      "elapsed 0:30, ETA 7:50")
  assert lines[-1].startswith("aff: 160/600 (27%), 1 step/s, loss=0.0063")
  assert len(lines) == 3  # 160 is the line at 60 s; close adds nothing new.


def test_a_terminal_gets_a_live_bar(clock):
  out = Terminal()
  with progress.Progress(total=10, desc="infer_cam", unit="img", file=out) as bar:
    bar.set_postfix(loss="0.5")
    for _ in range(10):
      bar.update(1)
  text = out.getvalue()
  assert "\r" in text and "infer_cam" in text and "10/10" in text and "loss=0.5" in text
  assert "elapsed" not in text  # No plain lines.


def test_in_a_notebook_kernel_a_bar_even_when_stderr_is_no_terminal(monkeypatch):
  assert not progress.in_notebook()
  shell = types.SimpleNamespace(config={"IPKernelApp": {}})
  monkeypatch.setitem(sys.modules, "IPython",
                      types.SimpleNamespace(get_ipython=lambda: shell))
  assert progress.in_notebook()

  class Widget:  # Stands in for tqdm.auto's notebook bar.
    made = []

    def __init__(self, **kwargs):
      Widget.made.append(kwargs)

    def update(self, n):
      pass

    def close(self):
      pass

  monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=Widget))
  out = io.StringIO()
  with progress.Progress(total=3, desc="infer_rw", file=out) as bar:
    bar.update(3)
  assert Widget.made[0]["total"] == 3 and Widget.made[0]["desc"] == "infer_rw"
  assert out.getvalue() == ""  # No plain lines.


def test_disabled_writes_nothing_and_disable_none_means_lines(clock):
  out = io.StringIO()
  with progress.Progress(total=5, disable=True, file=out) as bar:
    bar.update(5)
  assert out.getvalue() == ""
  with progress.Progress(total=5, disable=None, desc="d", file=out) as bar:
    bar.update(5)
  assert out.getvalue().splitlines()[-1].startswith("d: 5/5 (100%)")


def test_iterating_counts_items_and_takes_len_when_there_is_one(clock):
  out = io.StringIO()
  assert list(progress.Progress([1, 2, 3], desc="list", file=out)) == [1, 2, 3]
  assert out.getvalue().splitlines()[-1].startswith("list: 3/3 (100%)")
  out = io.StringIO()
  assert sum(progress.Progress((i for i in range(4)), desc="gen", file=out)) == 6
  assert out.getvalue().splitlines()[-1].startswith("gen: 4, ")  # No total, no ETA.
  with pytest.raises(TypeError):
    iter(progress.Progress(total=1, disable=True)).__next__()


def test_interval_from_the_environment(monkeypatch, clock):
  monkeypatch.setenv(progress.ENV_INTERVAL, "2")
  out = io.StringIO()
  with progress.Progress(total=10, file=out) as bar:
    for _ in range(4):
      clock.t += 1
      bar.update(1)
  assert len(out.getvalue().splitlines()) == 3  # Start, at 2 s, at 4 s.
  monkeypatch.setenv(progress.ENV_INTERVAL, "often")
  assert progress.Progress(total=1, disable=True).every_s == progress.DEFAULT_INTERVAL_S


def test_nothing_to_do_prints_nothing(clock):
  out = io.StringIO()
  with progress.Progress(total=0, desc="dense CRF", file=out):
    pass
  assert out.getvalue() == ""


def test_evaluation_loop_reports_without_a_terminal(capsys):
  pairs = [(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))] * 3
  cm = confusion.accumulate(iter(pairs), num_classes=2, progress="CAM")
  assert cm[0, 0] == 12
  assert capsys.readouterr().err.splitlines()[-1].startswith("CAM: 3, ")


def test_fast_rates_without_exponents(clock):
  out = io.StringIO()
  with progress.Progress(total=5000, desc="CAM+RW", unit="img", every_s=1, file=out) as bar:
    clock.t += 1.5
    bar.update(2040)
  assert ", 1360 img/s," in out.getvalue().splitlines()[1]


def test_format_seconds():
  assert progress.format_seconds(0) == "0:00"
  assert progress.format_seconds(74.4) == "1:14"
  assert progress.format_seconds(3725) == "1:02:05"
