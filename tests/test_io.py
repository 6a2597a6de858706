"""Atomic writers leave either the old file or the complete new one."""

import os

import numpy as np
import pytest

from affinity_jax import io


def test_write_and_read_back(tmp_path):
  path = str(tmp_path / "a" / "x.npz")
  io.save_npz(path, x=np.arange(5))
  np.testing.assert_array_equal(np.load(path)["x"], np.arange(5))
  assert os.listdir(tmp_path / "a") == ["x.npz"]


def test_failure_keeps_old_file_and_no_temp(tmp_path):
  path = str(tmp_path / "t.txt")
  io.write_text(path, "old")
  with pytest.raises(RuntimeError):
    with io.atomic_open(path, "w") as f:
      f.write("half")
      raise RuntimeError("killed")
  assert open(path).read() == "old"
  assert os.listdir(tmp_path) == ["t.txt"]


def test_files_get_the_usual_permissions(tmp_path):
  path = str(tmp_path / "p.txt")
  io.write_text(path, "x")
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
