"""affinity_jax.workdir: the layout existing workdirs have, each store's round trip, and
the lock that keeps a workdir to one run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from affinity_jax import workdir
from affinity_jax.errors import UserError
from affinity_jax.models import heads
from affinity_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_is_the_one_existing_workdirs_have(tmp_path):
  root = str(tmp_path)
  files = Workdir(root, process_index=3)
  assert files.config == os.path.join(root, "config.json")
  assert files.datasets == os.path.join(root, "tfds")
  assert files.cams.path("a") == os.path.join(root, "cam_maps", "a.npz")
  assert files.crf.path("a") == os.path.join(root, "crf", "a.npz")
  assert files.rw.path("a") == os.path.join(root, "rw", "a.png")
  assert files.rw_crf.path("a") == os.path.join(root, "rw_crf", "a.png")
  assert files.reports.path("results.json") == os.path.join(root, "eval", "results.json")
  for kind in ("cam", "aff", "seg"):
    store = files.checkpoints(kind)
    assert store.directory == os.path.join(root, kind)
    assert store.checkpoints == os.path.join(root, kind, "ckpt")
  assert files.pseudo_labels(dcrf=True) is files.rw_crf
  assert files.pseudo_labels(dcrf=False) is files.rw
  files.cams.mark_finished()
  assert os.path.exists(os.path.join(root, "cam_maps", "DONE-3"))
  assert files.cams.finished() and not Workdir(root, process_index=0).cams.finished()


def test_per_image_stores_round_trip(tmp_path):
  files = Workdir(str(tmp_path))
  rng = np.random.default_rng(0)
  cams = rng.uniform(size=(5, 7, 2)).astype(np.float32)
  assert not files.cams.exists("x")
  files.cams.save("x", cams, [3, 9])
  got, keys = files.cams.load("x")
  np.testing.assert_allclose(got, cams, atol=1e-3)   # float16 on disk.
  np.testing.assert_array_equal(keys, [3, 9])
  assert files.cams.exists("x") and not files.cams.exists("y")

  la = rng.uniform(size=(5, 7, 3))
  files.crf.save("x", la, la, [0, 3, 9])
  la2, _, keys = files.crf.load("x")
  np.testing.assert_allclose(la2, la, atol=0.5 / 255 + 1e-6)
  np.testing.assert_array_equal(keys, [0, 3, 9])

  label = rng.integers(0, 21, (5, 7)).astype(np.uint8)
  files.rw.save("x", label)
  np.testing.assert_array_equal(files.rw.load("x"), label)
  assert not files.rw_crf.exists("x")


def test_unreadable_files_are_one_line_errors(tmp_path):
  files = Workdir(str(tmp_path))
  os.makedirs(files.cams.directory)
  with open(files.cams.path("bad"), "w") as f:
    f.write("not npz")
  with pytest.raises(UserError, match="cam_maps/bad.npz.*--mode=infer_cam"):
    files.cams.load("bad")
  with pytest.raises(UserError, match="rw/none.png"):
    files.rw.load("none")
  with pytest.raises(UserError, match="eval/results.md"):
    files.reports.markdown()
  assert not files.reports.finished()


def test_checkpoint_store_without_checkpoint(tmp_path):
  store = Workdir(str(tmp_path)).checkpoints("aff")
  assert store.latest_step() is None and not store.exists() and not store.finished(1)
  assert not os.path.exists(store.checkpoints)   # Reading creates nothing.
  model = heads.AffinityNet("tiny", rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"aff/ckpt: training stage train_aff has not "
                     r"finished \(step 0 of 5\); run --mode=train_aff first"):
    store.load(model, steps=5)
  with pytest.raises(ValueError, match="kind"):
    Workdir(str(tmp_path)).checkpoints("rw")


# ------------------------------------------------------------------------------ the lock

_HOLD = """
import sys, time
from affinity_jax import workdir
held = workdir.lock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_one_run_per_workdir_and_a_killed_holder_blocks_nothing(tmp_path):
  root = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, root], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    for check in (workdir.lock, workdir.refuse_if_in_use):
      with pytest.raises(workdir.InUse) as e:
        check(root)
      assert str(e.value).startswith(f"workdir {root} is in use by another run (host "
                                     f"{socket.gethostname()}, pid {holder.pid}, since ")
      assert "\n" not in str(e.value)
      assert e.value.holder["pid"] == holder.pid
  finally:
    holder.kill()   # SIGKILL: no cleanup runs.
    holder.wait()
  with workdir.lock(root) as held:   # The kernel dropped the dead holder's lock.
    assert json.load(open(held.path))["pid"] == os.getpid()
    with pytest.raises(workdir.InUse):   # Also against this process's own hold.
      workdir.lock(root)
  workdir.refuse_if_in_use(root)
  with workdir.lock(root):
    pass


def test_looking_at_a_new_workdir_writes_nothing(tmp_path):
  root = str(tmp_path / "new")
  workdir.refuse_if_in_use(root)
  assert not os.path.exists(root)
