"""Executes colab/*.ipynb in small mode with nbclient, as CI does: a failing cell fails.

The 'parameters' cell gets SMALL = True and a temporary WORKDIR appended. The demo
notebook reuses the session's tiny workdir (conftest.py), so its pipeline cell only
opens it; `demo.run_pipeline` itself is exercised by that fixture.
"""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_TIMEOUT_S = 300


def execute(name: str, **params) -> nbformat.NotebookNode:
  """Runs colab/<name> in a python3 kernel (this interpreter) from the repo root."""
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
  cells[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute()   # Raises CellExecutionError on the first failing cell.
  return nb


def _outputs(nb, mime):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if mime in o.get("data", {})]


def test_demo_notebook(tiny_workdir):
  nb = execute("demo.ipynb", SMALL=True, WORKDIR=tiny_workdir, NUM_IMAGES=2)
  for png in ("demo_panels.png", "demo_own_image.png", "demo_refine.png",
              "eval/training_curves.png"):
    assert os.path.getsize(os.path.join(tiny_workdir, png)) > 1000
  assert len(_outputs(nb, "image/png")) == 4
  assert any("mIoU" in o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown"))


def test_propagation_benchmark_notebook(tmp_path):
  nb = execute("propagation_benchmark.ipynb", SMALL=True, WORKDIR=str(tmp_path))
  with open(tmp_path / "propagation.json") as f:
    rows = json.load(f)["rows"]
  assert {r["method"] for r in rows} == {"dense NumPy", "dense JAX", "banded JAX"}
  assert len({r["nodes"] for r in rows}) == 2
  # Banded and dense agree (same edges, same t).
  assert max(r["max_abs_diff_vs_dense_numpy"] for r in rows) < 1e-3
  assert os.path.getsize(tmp_path / "propagation.png") > 1000
  assert len(_outputs(nb, "image/png")) == 1
