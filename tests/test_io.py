"""Atomic writers leave either the old file or the complete new one."""

import errno
import os
import tempfile

import numpy as np
import pytest

from affinity_jax import io
from affinity_jax.errors import UserError


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


@pytest.mark.parametrize("where, error, cause", [
    ("os.fsync", OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    ("tempfile.mkstemp", PermissionError(errno.EACCES, "Permission denied"),
     "permission denied"),
])
def test_a_full_or_unwritable_disk_is_one_line_and_keeps_the_old_file(
    tmp_path, monkeypatch, where, error, cause):
  path = str(tmp_path / "store" / "x.npz")
  io.save_npz(path, x=np.arange(3))
  module, name = where.split(".")

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr({"os": os, "tempfile": tempfile}[module], name, fail)
  with pytest.raises(UserError) as e:
    io.save_npz(path, x=np.arange(5))
  monkeypatch.undo()
  message = str(e.value)
  assert message.startswith(f"cannot write {path}: {cause} ({error.strerror}); ")
  assert "\n" not in message
  np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))   # The old one, whole.
  assert os.listdir(tmp_path / "store") == ["x.npz"]                # No temporary file.


def test_other_errors_pass_unchanged(tmp_path, monkeypatch):
  def fail(*args):
    raise OSError(errno.EIO, "I/O error")
  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="I/O error"):
    io.write_text(str(tmp_path / "t.txt"), "x")
