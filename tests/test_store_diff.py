"""benchmarks.store_diff: CAM and pseudo-mask differences between two workdirs."""

import os
import shutil

from affinity_jax.benchmarks import store_diff
from affinity_jax.workdir import Workdir


def test_store_diff_of_a_workdir_with_itself_and_with_changed_cams(tiny_workdir, tmp_path):
  same = store_diff.compare(tiny_workdir, tiny_workdir)
  assert same["images"] > 0 and same["cam_max_abs"] == 0 and same["rw_pixels_equal"] == 1
  other = str(tmp_path / "other")
  shutil.copytree(tiny_workdir, other)
  store = Workdir(other).cams
  image_id = sorted(n for n in os.listdir(store.directory) if n.endswith(".npz"))[0][:-4]
  cams, keys = store.load(image_id)
  cams[-1, -1] += 0.5      # One pixel in the bottom-right edge band.
  store.save(image_id, cams, keys)
  diff = store_diff.compare(tiny_workdir, other, edge=4)
  assert abs(diff["cam_max_abs"] - 0.5) < 1e-2 and diff["cam_mean_abs"]["inner"] == 0
  assert diff["cam_mean_abs"]["edge"] > 0
