"""Per-class IoU / mIoU tables for several methods side by side; results.json and results.md
(with the training curves of the run when its metrics logs are there).

Table layout: one column per method, one row per label (background, the 20 VOC classes),
then an mIoU row; values in percent with one decimal, '-' for a class absent from both the
ground truth and the prediction of that method (left out of its mIoU, see ops/metrics.py).
"""

import math
import os
from typing import Mapping, Sequence

import numpy as np

from affinity_jax import io
from affinity_jax.constants import LABEL_NAMES
from affinity_jax.evaluation import label_quality
from affinity_jax.evaluation import plots
from affinity_jax.ops import metrics

CURVES_PNG = "training_curves.png"


def summarize(cms: Mapping[str, np.ndarray], names: Sequence[str] = LABEL_NAMES) -> dict:
  """Numbers for each method.

  Args:
    cms: {method: confusion matrix [C, C + 1]} in display order.
    names: C label names.

  Returns:
    {"classes": names, "methods": {method: {"miou": float, "iou": {name: float|None},
    "pixels": int, "confusion": [[int]]}}}; IoUs are fractions in [0, 1], None = absent.
  """
  out = {"classes": list(names), "methods": {}}
  for method, cm in cms.items():
    cm = np.asarray(cm)
    if cm.shape[0] != len(names):
      raise ValueError(f"{method}: confusion matrix has {cm.shape[0]} classes, "
                       f"expected {len(names)}")
    iou = metrics.iou_per_class(cm)
    miou = metrics.mean_iou(cm)
    out["methods"][method] = {
        "miou": None if math.isnan(miou) else miou,
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "pixels": int(cm.sum()),
        "confusion": cm.astype(np.int64).tolist(),
    }
  return out


def present_classes(results: dict) -> list[str]:
  """Names of the labels that appear in the ground truth or prediction of any method."""
  return [n for n in results["classes"]
          if any(m["iou"][n] is not None for m in results["methods"].values())]


def table(results: dict, only_present: bool = False) -> str:
  """A Markdown table: classes as rows, methods as columns, then the mIoU row."""
  methods = list(results["methods"])
  rows = present_classes(results) if only_present else results["classes"]
  fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
  width = max([len(r) for r in rows] + [len("mIoU"), len("class")])
  cols = [max(len(m), 5) for m in methods]
  line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                                         in enumerate(zip(cells, [width] + cols))) + " |"
  out = [line(["class"] + methods),
         "|" + "|".join(["-" * (width + 2)] + ["-" * (w + 1) + ":" for w in cols]) + "|"]
  for r in rows:
    out.append(line([r] + [fmt(results["methods"][m]["iou"][r]) for m in methods]))
  out.append(line(["mIoU"] + [fmt(results["methods"][m]["miou"]) for m in methods]))
  return "\n".join(out)


def write(out_dir: str, cms: Mapping[str, np.ndarray], *, only_present: bool = False,
          title: str = "Evaluation", names: Sequence[str] = LABEL_NAMES,
          echo: bool = True, labels: dict | None = None,
          curves: Mapping[str, str] | None = None) -> dict:
  """Writes `results.json` and `results.md` in `out_dir` (atomically) and prints the table.

  Args:
    labels: optional `label_quality.summarize` numbers of the affinity labels; stored
      under "affinity_labels" and shown as a second table.
    curves: {network: metrics.jsonl path} whose loss and learning rate are drawn in
      `<out_dir>/training_curves.png` and shown in results.md (e.g. the workdir's
      `Workdir.training_logs()`; missing logs are left out; default none).

  Returns:
    The `summarize` dict that went into results.json.
  """
  results = summarize(cms, names)
  text = table(results, only_present)
  if labels is not None:
    results["affinity_labels"] = labels
  io.write_json(os.path.join(out_dir, "results.json"), results)
  pixels = ", ".join(f"{m}: {r['pixels']:,}" for m, r in results["methods"].items())
  labels_text = label_quality.table(labels) if labels is not None else None
  md = f"# {title}\n\nIoU per class and mIoU, %. Pixels scored: {pixels}.\n\n{text}\n"
  if labels_text:
    md += ("\n## Affinity labels against the true masks\n\n"
           "What AffinityNet learns from (the CRF labels of the scored images, whole "
           "images, no crop): see docs/evaluation.md.\n\n" + labels_text + "\n")
  drawn = plots.training_curves(os.path.join(out_dir, CURVES_PNG), curves or {})
  if drawn:
    md += ("\n## Training curves\n\n"
           f"Loss (per step and its running mean) and learning rate of {', '.join(drawn)}, "
           f"from each network's metrics.jsonl.\n\n![training curves]({CURVES_PNG})\n")
  io.write_text(os.path.join(out_dir, "results.md"), md)
  if echo:
    print(text)
    if labels_text:
      print(labels_text)
  return results
