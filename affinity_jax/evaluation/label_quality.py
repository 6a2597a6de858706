"""How good the labels are that AffinityNet learns from, measured against the true masks.

The `aff_labels` stage turns each image's CRF marginals into a 1/8-resolution label map
(`transforms.label_map_from_crf`: confident foreground, confident background, 255 for
neutral) and the map into pixel-pair labels (`ops.affinity.affinity_labels`: `bg_pos`,
`fg_pos`, `neg` within the radius). Here the same two functions run on the whole image
(no crop, no flip) and on the ground truth sampled at the cell centres, and we count:

- label map: cells labelled (not 255), and of those with a known true label the ones
  that are right, for background and foreground cells apart;
- pairs: for each kind, the predicted pairs whose both ends have a known true label, and
  of those the ones whose true pair has the same kind (precision); and of the true pairs
  of each kind the ones predicted as that kind (recall).

The first thing to read when the random walk does not help: AffinityNet can only learn
affinities as right as these labels.
"""

from typing import Iterable

import numpy as np

from affinity_jax.constants import IGNORE
from affinity_jax.data import transforms
from affinity_jax.ops import affinity

PAIR_KINDS = ("bg_pos", "fg_pos", "neg")
# Label maps are padded to this many cells per side (255: no pairs), so that every
# VOC image (<= 500 px, 63 cells) shares one compiled `affinity_labels`.
_GRID = 64


def cell_centres(mask: np.ndarray, stride: int = 8) -> np.ndarray:
  """The true label at the centre pixel of each stride x stride cell.

  Args:
    mask: uint8 [H, W] ground truth, H and W multiples of `stride` (pad with 255).

  Returns:
    uint8 [H/stride, W/stride].
  """
  return mask[stride // 2::stride, stride // 2::stride]


def _pad_grid(label_map: np.ndarray, size: int) -> np.ndarray:
  out = np.full((size, size), IGNORE, np.uint8)
  out[:label_map.shape[0], :label_map.shape[1]] = label_map
  return out


def image_counts(la: np.ndarray, ha: np.ndarray, keys: np.ndarray, mask: np.ndarray,
                 offsets: np.ndarray, border: str = "full", stride: int = 8) -> dict:
  """Counts for one image (summed over images by `summarize`).

  Args:
    la, ha: float32 [H, W, L] CRF marginals at low and high background power.
    keys: int [L] label id of each channel (0 first).
    mask: uint8 [H, W] ground truth (255 = ignore).
    offsets: int [K, 2] pair offsets (`neighbors.half_disk_offsets(radius)`).
    border: pair rule of `affinity_labels`.

  Returns:
    {"cells": n, "labelled": n, "bg": [labelled, known, right], "fg": [...],
     "<kind>": [predicted with known truth, right, true pairs] for each pair kind}.
  """
  pad = lambda a, fill: transforms.pad_to_multiple(a, stride, fill)[0]
  pred = transforms.label_map_from_crf(pad(la, 0.0), pad(ha, 0.0), keys, stride)
  true = cell_centres(pad(mask, IGNORE), stride)
  h, w = pred.shape
  known = true != IGNORE
  out = {"cells": int(h * w), "labelled": int(np.sum(pred != IGNORE))}
  for name, sel in (("bg", pred == 0), ("fg", (pred != IGNORE) & (pred != 0))):
    out[name] = [int(sel.sum()), int((sel & known).sum()), int((sel & known & (pred == true)).sum())]
  size = max(_GRID, -(-max(h, w) // _GRID) * _GRID)
  both = np.stack([_pad_grid(pred, size), _pad_grid(true, size)])
  labels = {k: np.asarray(v) for k, v in affinity.affinity_labels(both, offsets, border).items()}
  true_known = labels["bg_pos"][1] | labels["fg_pos"][1] | labels["neg"][1]
  for kind in PAIR_KINDS:
    p, t = labels[kind][0], labels[kind][1]
    out[kind] = [int((p & true_known).sum()), int((p & t).sum()), int(t.sum())]
  return out


def summarize(counts: Iterable[dict]) -> dict:
  """Sums per-image counts into the report's numbers (fractions in [0, 1]).

  Returns:
    {"images": n, "label_map": {"coverage", "precision", "bg_precision",
    "fg_precision", "cells"}, "pairs": {kind: {"precision", "recall", "count"}}}.
  """
  total, n = None, 0
  for c in counts:
    n += 1
    total = c if total is None else {k: (np.add(total[k], v).tolist() if isinstance(v, list)
                                         else total[k] + v) for k, v in c.items()}
  if total is None:
    return {"images": 0}
  ratio = lambda a, b: float(a) / b if b else None
  bg, fg = total["bg"], total["fg"]
  out = {"images": n, "label_map": {
      "cells": total["cells"],
      "coverage": ratio(total["labelled"], total["cells"]),
      "precision": ratio(bg[2] + fg[2], bg[1] + fg[1]),
      "bg_precision": ratio(bg[2], bg[1]),
      "fg_precision": ratio(fg[2], fg[1])}, "pairs": {}}
  for kind in PAIR_KINDS:
    known, right, true = total[kind]
    out["pairs"][kind] = {"count": known, "precision": ratio(right, known),
                          "recall": ratio(right, true)}
  return out


def table(quality: dict) -> str:
  """Markdown: the label map's numbers, then one row per pair kind."""
  if not quality.get("images"):
    return "No CRF labels on the scored images."
  pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
  m = quality["label_map"]
  lines = [f"Label map at 1/8 resolution ({quality['images']} images, {m['cells']:,} cells): "
           f"{pct(m['coverage'])}% labelled; precision {pct(m['precision'])}% "
           f"(background {pct(m['bg_precision'])}%, foreground {pct(m['fg_precision'])}%).",
           "", "| pair label | pairs | precision % | recall % |", "|---|--:|--:|--:|"]
  for kind, p in quality["pairs"].items():
    lines.append(f"| {kind} | {p['count']:,} | {pct(p['precision'])} | {pct(p['recall'])} |")
  return "\n".join(lines)
