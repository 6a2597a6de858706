"""Affinity-label quality: counts against a plain loop over cells and pairs."""

import numpy as np
import pytest

from affinity_jax.evaluation import label_quality, report
from affinity_jax.ops import neighbors


def _one_hot_crf(label_map_full, keys, low_bg, high_bg):
  """CRF marginals whose argmax is `label_map_full`, with background made neutral
  (low alpha) or confident (high alpha) where the masks say so."""
  lk = {k: i for i, k in enumerate(keys)}
  la = np.zeros(label_map_full.shape + (len(keys),), np.float32)
  ha = np.zeros_like(la)
  idx = np.vectorize(lk.get)(label_map_full)
  np.put_along_axis(la, idx[..., None], 1.0, -1)
  np.put_along_axis(ha, idx[..., None], 1.0, -1)
  la[low_bg] = 0; la[low_bg, 0] = 1   # la says background: neutral (255) in the map
  ha[high_bg] = 0; ha[high_bg, 0] = 1  # ha says background: confident background
  return la, ha


def _brute(pred, true, offsets):
  """Pair counts by a loop over sources and offsets (every pair inside the map)."""
  h, w = pred.shape
  out = {k: [0, 0, 0] for k in label_quality.PAIR_KINDS}
  kind = lambda a, b: None if 255 in (a, b) else ("neg" if a != b else ("bg_pos" if a == 0 else "fg_pos"))
  for y in range(h):
    for x in range(w):
      for dy, dx in offsets:
        yy, xx = y + dy, x + dx
        if not (0 <= yy < h and 0 <= xx < w):
          continue
        p, t = kind(pred[y, x], pred[yy, xx]), kind(true[y, x], true[yy, xx])
        if t is not None:
          out[t][2] += 1
        if p is not None and t is not None:
          out[p][0] += 1
          out[p][1] += p == t
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_image_counts_match_a_loop_over_pairs(seed):
  rng = np.random.default_rng(seed)
  h, w, stride = 37, 45, 8       # Not multiples of 8: the padding must give no pairs.
  keys = np.array([0, 3, 15])
  truth = rng.choice([0, 3, 15], (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
  mask = truth.astype(np.uint8).copy()
  mask[rng.random((h, w)) < 0.05] = 255
  guess = np.where(rng.random((h, w)) < 0.3, rng.choice(keys, (h, w)), truth)
  low_bg = rng.random((h, w)) < 0.3
  high_bg = (rng.random((h, w)) < 0.2) & low_bg
  la, ha = _one_hot_crf(guess, keys, low_bg, high_bg)
  offsets = neighbors.half_disk_offsets(3)
  got = label_quality.image_counts(la, ha, keys, mask, offsets)

  from affinity_jax.data import transforms
  pad = lambda a, f: transforms.pad_to_multiple(a, stride, f)[0]
  pred = transforms.label_map_from_crf(pad(la, 0.0), pad(ha, 0.0), keys, stride)
  true = pad(mask, 255)[4::8, 4::8]
  assert got["cells"] == pred.size and got["labelled"] == int((pred != 255).sum())
  known = true != 255
  assert got["bg"] == [int((pred == 0).sum()), int(((pred == 0) & known).sum()),
                       int(((pred == 0) & (true == 0)).sum())]
  want = _brute(pred, true, offsets)
  for kind in label_quality.PAIR_KINDS:
    assert got[kind] == want[kind], kind
  assert sum(want[k][0] for k in want) > 0   # The case has pairs to count.


def test_perfect_labels_score_one_and_the_report_shows_them(tmp_path):
  keys = np.array([0, 7])
  truth = np.zeros((64, 64), np.uint8)
  truth[16:48, 8:40] = 7
  none = np.zeros(truth.shape, bool)
  la, ha = _one_hot_crf(truth, keys, none, truth == 0)
  q = label_quality.summarize([label_quality.image_counts(la, ha, keys, truth,
                                                          neighbors.half_disk_offsets(5))] * 2)
  assert q["images"] == 2 and q["label_map"]["precision"] == 1.0
  assert q["label_map"]["coverage"] == 1.0
  for kind in label_quality.PAIR_KINDS:
    assert q["pairs"][kind]["precision"] == 1.0 and q["pairs"][kind]["count"] > 0
  # Background left neutral: background cells unlabelled, foreground still right.
  la, _ = _one_hot_crf(truth, keys, none, none)
  _, ha = _one_hot_crf(np.full_like(truth, 7), keys, none, none)
  q2 = label_quality.summarize([label_quality.image_counts(la, ha, keys, truth,
                                                           neighbors.half_disk_offsets(5))])
  assert q2["label_map"]["coverage"] == 0.25 and q2["pairs"]["bg_pos"]["count"] == 0
  cm = np.zeros((21, 22), np.int64)
  cm[0, 0], cm[7, 7] = 10, 5
  results = report.write(str(tmp_path), {"CAM": cm}, labels=q2, echo=False)
  assert results["affinity_labels"]["pairs"]["fg_pos"]["precision"] == 1.0
  md = (tmp_path / "results.md").read_text()
  assert "| fg_pos |" in md and "25.0% labelled" in md
