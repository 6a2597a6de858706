"""Confusion matrices accumulated over a split, one per method, from lazily loaded pairs."""

import os
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from affinity_jax.errors import UserError
from affinity_jax.ops import metrics
from affinity_jax.progress import Progress


def read_label_png(path: str) -> np.ndarray:
  """A label map saved as a (palette) PNG -> uint8 [H, W] label ids."""
  from PIL import Image

  try:
    with Image.open(path) as img:
      if img.mode not in ("P", "L"):
        raise UserError(f"{path}: expected a palette or grey label PNG, got mode {img.mode}")
      return np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise UserError(f"{path}: label PNG missing") from None


def png_pairs(ids: Iterable[str], pred_dir: str,
              gt: Callable[[str], np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Lazily yields (pred, gt) for each id from `<pred_dir>/<id>.png` and `gt(id) -> [H, W]`."""
  for i in ids:
    yield read_label_png(os.path.join(pred_dir, f"{i}.png")), np.asarray(gt(i))


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
