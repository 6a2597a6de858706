"""Scoring a workdir's stored labels: evaluation reads the stores and the examples itself."""

import numpy as np

from affinity_jax.data import sources
from affinity_jax.evaluation import confusion
from affinity_jax.evaluation import label_quality
from affinity_jax.evaluation import pseudo_labels
from affinity_jax.ops import cam as cam_ops
from affinity_jax.ops import neighbors
from affinity_jax.workdir import Workdir


class _Split:
  """What `sources.ById` reads of a split: `ids()` and examples by record index."""

  def __init__(self, examples):
    self.examples = examples

  def ids(self):
    return [e["id"] for e in self.examples]

  def __getitem__(self, index):
    return self.examples[index]


def _example(image_id, seed, h=16, w=24):
  rng = np.random.default_rng(seed)
  mask = np.zeros((h, w), np.uint8)
  mask[4:12, 6:18] = 3
  mask[0, :] = 255
  return dict(id=image_id, image=rng.integers(0, 255, (h, w, 3), np.uint8), mask=mask)


def _workdir(tmp_path, examples, with_crf=True):
  files = Workdir(str(tmp_path))
  for n, e in enumerate(examples):
    rng = np.random.default_rng(n)
    keys = np.array([3, 15])
    cams = rng.uniform(size=e["mask"].shape + (2,)).astype(np.float32)
    cams[..., 0] += (e["mask"] == 3)
    files.cams.save(e["id"], cams / cams.max(), keys)
    files.rw.save(e["id"], np.where(rng.random(e["mask"].shape) < 0.8, e["mask"] % 255, 0)
                  .astype(np.uint8))
    files.rw_crf.save(e["id"], (e["mask"] % 255).astype(np.uint8))
    if with_crf:
      la = rng.uniform(size=e["mask"].shape + (2,)).astype(np.float32)
      files.crf.save(e["id"], la, la[..., ::-1].copy(), np.array([0, 3]))
  return files


def test_by_id_takes_the_first_split_holding_an_id():
  first = _Split([dict(id="a", n=1), dict(id="b", n=1)])
  second = _Split([dict(id="b", n=2), dict(id="c", n=2)])
  examples = sources.ById([first, second])
  assert examples.ids() == ["a", "b", "c"]
  assert [examples[i]["n"] for i in "abc"] == [1, 1, 2]


def test_scores_read_the_stores_and_the_true_masks(tmp_path):
  examples = [_example("x", 0), _example("y", 1)]
  by_id = sources.ById([_Split(examples)])
  files = _workdir(tmp_path, examples)
  ids = ["y", "x"]
  cms = pseudo_labels.confusions(files, by_id, ids, cam_threshold=0.15,
                                 cam_sweep=(0.15, 0.5), dcrf=True)
  assert list(cms)[0] == "CAM" and list(cms)[2:] == ["CAM+RW", "CAM+RW+dCRF"]
  masks = {e["id"]: e["mask"] for e in examples}
  want = confusion.cam_baselines(
      [(cam_ops.full_cams(*files.cams.load(i)), masks[i]) for i in ids], 0.15, (0.15, 0.5))
  want.update(confusion.evaluate(
      {"CAM+RW": [(files.rw.load(i), masks[i]) for i in ids],
       "CAM+RW+dCRF": [(files.rw_crf.load(i), masks[i]) for i in ids]}))
  assert list(cms) == list(want)
  for name in want:
    np.testing.assert_array_equal(cms[name], want[name])
  assert list(pseudo_labels.confusions(files, by_id, ids, cam_threshold=0.15)) == [
      "CAM", "CAM+RW"]


def test_affinity_labels_only_of_images_with_crf_labels(tmp_path):
  examples = [_example("x", 0), _example("y", 1)]
  by_id = sources.ById([_Split(examples)])
  files = _workdir(tmp_path, examples)
  got = pseudo_labels.affinity_labels(files, by_id, ["x", "y", "z"], radius=2)
  offsets = neighbors.half_disk_offsets(2)
  want = label_quality.summarize(
      label_quality.image_counts(*files.crf.load(e["id"]), e["mask"], offsets)
      for e in examples)
  assert got == want and got["images"] == 2
  bare = _workdir(tmp_path / "bare", examples, with_crf=False)
  assert pseudo_labels.affinity_labels(bare, by_id, ["x", "y"], radius=2) is None


def test_overlays_of_the_stored_labels(tmp_path):
  examples = [_example("x", 0), _example("y", 1)]
  files = _workdir(tmp_path, examples)
  path = str(tmp_path / "overlays.png")
  assert pseudo_labels.overlays(path, files, sources.ById([_Split(examples)]), ["x"],
                                dcrf=True) == 1
  assert (tmp_path / "overlays.png").stat().st_size > 0
