"""Fixtures shared by several test files."""

import pytest

from affinity_jax import demo

TINY = "configs/scenes.py:tiny"


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir where the whole tiny scenes pipeline has run, once per session (~1 min).

  Tests read it; a test that changes its files works on a copy (see test_stages.py).
  """
  workdir = str(tmp_path_factory.getbasetemp() / "scenes_tiny")
  demo.run_pipeline(TINY, workdir)
  return workdir
