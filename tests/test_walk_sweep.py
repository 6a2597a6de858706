"""benchmarks.walk_sweep: walk settings chosen on one half of the images, scored on the other."""

import numpy as np

from affinity_jax import sharding
from affinity_jax import workdir as workdir_lib
from affinity_jax.benchmarks import walk_sweep
from affinity_jax.evaluation import pseudo_labels
from affinity_jax.ops import metrics
from affinity_jax.stages import common


def test_the_workdirs_own_setting_scores_as_its_stored_walk_labels(tiny_workdir):
  _, config = workdir_lib.saved_config(tiny_workdir)
  a, b = config.rw.alpha, config.rw.beta
  result = walk_sweep.sweep(tiny_workdir, (a, 2 * a), (b,), dcrf_weights=(1.0,))
  ids_a, ids_b = result["halves"]
  assert ids_a and ids_b and not set(ids_a) & set(ids_b)
  ctx = common.Context(config, tiny_workdir, sharding.make_mesh())
  stored = pseudo_labels.confusions(ctx.files, ctx.examples, ids_a + ids_b,
                                    cam_threshold=config.eval.cam_threshold)["CAM+RW"]
  swept = sum(result["rw"][(a, b)])
  assert swept.sum() == stored.sum()
  assert abs(metrics.mean_iou(swept) - metrics.mean_iou(stored)) < 0.01
  assert not np.array_equal(sum(result["rw"][(2 * a, b)]), swept)
  assert sum(result["dcrf"][1.0]).sum() == stored.sum()


def test_choose_reports_each_halfs_winner_on_the_other_half():
  cm = lambda right, wrong: np.array([[right, wrong, 0], [wrong, right, 0]])
  cms = {"x": [cm(9, 1), cm(5, 5)], "y": [cm(8, 2), cm(7, 3)]}
  rows = walk_sweep.choose(cms)
  assert [r["setting"] for r in rows] == ["x", "y"]
  assert rows[0]["on_other_half"] < rows[0]["on_tuned_half"]
  assert rows[1]["on_other_half"] == 100 * metrics.mean_iou(cm(8, 2))
