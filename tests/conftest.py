"""Fixtures shared by several test files."""

import os

import pytest

from affinity_jax import demo

import voc_tiny

TINY = "configs/scenes.py:tiny"


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir where the whole tiny scenes pipeline has run, once per session (~1 min).

  Tests read it; a test that changes its files works on a copy (see test_stages.py).
  """
  workdir = str(tmp_path_factory.getbasetemp() / "scenes_tiny")
  demo.run_pipeline(TINY, workdir)
  return workdir


@pytest.fixture(scope="session")
def voc_tiny_workdir(tmp_path_factory):
  """A workdir where `voc_tiny`'s whole pipeline has run (8 devices, 1 process), once
  per session (~1.5 min); skips when ../shared/voc_sample is absent. Read only."""
  if not os.path.isdir(voc_tiny.SAMPLE):
    pytest.skip("../shared/voc_sample absent")
  from affinity_jax import config_lib
  from affinity_jax.stages import pipeline
  workdir = str(tmp_path_factory.getbasetemp() / "voc_tiny")
  config = config_lib.load_config(voc_tiny.CONFIG, voc_tiny.OVERRIDES)
  pipeline.run(config, voc_tiny.CONFIG, workdir)
  return workdir
