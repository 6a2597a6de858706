"""Fixtures shared by several test files."""

import pytest

from affinity_jax import demo

import voc_tiny

TINY = "configs/scenes.py:tiny"


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir where the whole tiny scenes pipeline has run, once per test run (~1 min).

  Tests read it; a test that changes its files works on a copy (see test_stages.py).
  """
  workdir = str(tmp_path_factory.getbasetemp() / "scenes_tiny")
  demo.run_pipeline(TINY, workdir)
  return workdir


@pytest.fixture(scope="session")
def voc_sample():
  """The real VOC sample's folder (the one holding VOC2012/, see voc_tiny.py); skips the
  test with the reason when it is absent."""
  reason = voc_tiny.sample_or_skip_reason()
  if reason:
    pytest.skip(reason)
  return voc_tiny.SAMPLE


@pytest.fixture(scope="session")
def voc_tiny_workdir(voc_sample, tmp_path_factory):
  """A workdir where `voc_tiny`'s whole pipeline has run (8 devices, 1 process), once
  per test run (~1.5 min); skips when the VOC sample is absent. Read only."""
  from affinity_jax import config_lib
  from affinity_jax.stages import pipeline
  workdir = str(tmp_path_factory.getbasetemp() / "voc_tiny")
  config = config_lib.load_config(voc_tiny.CONFIG, voc_tiny.OVERRIDES)
  pipeline.run(config, voc_tiny.CONFIG, workdir)
  return workdir
