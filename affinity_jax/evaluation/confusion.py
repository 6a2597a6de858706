"""Confusion matrices accumulated over a split, one per method, from lazily loaded pairs."""

import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from affinity_jax import io
from affinity_jax.ops import metrics
from affinity_jax.progress import Progress


def png_pairs(ids: Iterable[str], pred_dir: str,
              gt: Callable[[str], np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Lazily yields (pred, gt) for each id from `<pred_dir>/<id>.png` and `gt(id) -> [H, W]`."""
  for i in ids:
    yield io.read_label_png(os.path.join(pred_dir, f"{i}.png")), np.asarray(gt(i))


def accumulate(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int = 21,
               progress: str | None = None) -> np.ndarray:
  """Sums per-image confusion matrices.

  Args:
    pairs: iterable (usually a generator, so one image is in memory at a time) of
      (pred [H, W], gt [H, W]) integer label maps; gt 255 is ignored, pred outside
      0..C-1 counts as a miss (`affinity_jax.ops.metrics`).
    num_classes: C.
    progress: the description of a `progress.Progress` display (a bar on a terminal,
      timed lines otherwise), or None for none.

  Returns:
    int64 [C, C + 1] confusion matrix (rows gt, columns pred, last column out of range).
  """
  if progress is not None:
    pairs = Progress(pairs, desc=progress, unit="img")
  cm = np.zeros((num_classes, num_classes + 1), np.int64)
  for pred, gt in pairs:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
      raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    cm += metrics.confusion_np(pred, gt, num_classes)
  return cm


def evaluate(methods: Mapping[str, Iterable[tuple[np.ndarray, np.ndarray]]],
             num_classes: int = 21, progress: bool = False) -> dict[str, np.ndarray]:
  """`accumulate` for each method: {name: pairs} -> {name: [C, C + 1]} (order kept)."""
  return {name: accumulate(pairs, num_classes, name if progress else None)
          for name, pairs in methods.items()}


def cam_thresholds(pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                   thresholds: Iterable[float]) -> dict[float, np.ndarray]:
  """Confusion matrices of CAM-only labels at several background thresholds, one pass.

  Args:
    pairs: (cams float [H, W, 20], gt [H, W]) per image.
    thresholds: constant background scores t; the label is the argmax over [t, CAMs].

  Returns:
    {t: int64 [21, 22]}.
  """
  cms = {t: 0 for t in thresholds}
  for cams, gt in pairs:
    for t in cms:
      cms[t] = cms[t] + metrics.confusion_np(cam_labels(cams, t), gt)
  return cms


def cam_labels(cams: np.ndarray, threshold: float) -> np.ndarray:
  """`ops.cam.cam_label_map` in NumPy, so images of many sizes compile nothing: uint8
  [H, W], the argmax over [threshold, cams [H, W, 20]] (the background wins ties)."""
  cams = np.asarray(cams)
  return np.where(cams.max(-1) > threshold, cams.argmax(-1) + 1, 0).astype(np.uint8)


def cam_baselines(pairs: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float,
                  sweep: Sequence[float] = ()) -> dict[str, np.ndarray]:
  """The CAM-only rows of a report: at `threshold` and at the best threshold of `sweep`.

  Args:
    pairs: as `cam_thresholds`.
    threshold: the configured background score (`eval.cam_threshold`).
    sweep: thresholds to also score (`eval.cam_sweep`); the best by mIoU is reported
      so the CAM baseline is not judged by a threshold that suits it badly.

  Returns:
    {"CAM": cm} plus, with a sweep, {"CAM (best t=..)": cm}.
  """
  cms = cam_thresholds(pairs, dict.fromkeys((threshold,) + tuple(sweep)))
  out = {"CAM": cms[threshold]}
  if sweep:
    mious = {t: metrics.mean_iou(cms[t]) for t in sweep}
    best = max(mious, key=mious.get)
    out[f"CAM (best t={best:g})"] = cms[best]
    print("CAM mIoU by background threshold: "
          + ", ".join(f"{t:g}: {100 * m:.1f}" for t, m in mious.items()), flush=True)
  return out
