"""Segmentation metrics: confusion matrices (device and host), per-class IoU and mIoU.

Conventions (the same in the jnp and the NumPy versions):
- The confusion matrix `cm[g, p]` counts pixels with ground truth `g` (rows) and
  prediction `p` (columns); int64 on host, int32 on device (sum device matrices on host in
  int64 when a split has more than 2^31 pixels).
- Pixels whose ground truth is outside `0..C-1` (in particular 255 = ignore) are skipped.
- A prediction outside `0..C-1` (e.g. 255 in a pseudo label) is a wrong answer: the pixel
  counts as a false negative of its ground-truth class and a false positive of no class,
  so it lowers that class's IoU without raising any other class's FP. To keep these
  pixels in the one array, the matrix has an extra column: `cm` is `[C, C + 1]`, column C
  = "prediction outside the label range".
- Matrices add: accumulate a split by summing the per-batch matrices.
- IoU_c = TP / (TP + FP + FN) with TP = cm[c, c], FP = column sum over the first C
  columns minus TP, FN = row sum (all C + 1 columns) minus TP.
- mIoU = mean of IoU_c over the classes that appear in the ground truth or in the
  prediction (TP + FP + FN > 0); a class absent from both is NaN in the per-class IoU and
  left out of the mean (a NaN-mean). On full VOC splits every class appears, so this is
  the spec's mean over the 21 classes.
"""

import jax.numpy as jnp
import numpy as np


def confusion(pred, gt, num_classes: int = 21):
  """Confusion matrix of one batch on device (jittable).

  Args:
    pred: int array [...] of predicted labels (values outside 0..C-1 count as wrong).
    gt: int array [...] same shape, ground truth (values outside 0..C-1 are ignored).
    num_classes: C.

  Returns:
    int32 [C, C + 1]: rows = ground truth, columns = prediction, column C = out of range.
  """
  c = num_classes
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  gt = jnp.asarray(gt).astype(jnp.int32).reshape(-1)
  valid = (gt >= 0) & (gt < c)
  p = jnp.where((pred >= 0) & (pred < c), pred, c)
  index = jnp.where(valid, gt * (c + 1) + p, 0)
  counts = jnp.zeros((c * (c + 1),), jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(c, c + 1)


def confusion_np(pred: np.ndarray, gt: np.ndarray, num_classes: int = 21) -> np.ndarray:
  """Confusion matrix on host; same layout as `confusion`, int64 [C, C + 1]."""
  c = num_classes
  pred = np.asarray(pred).astype(np.int64).reshape(-1)
  gt = np.asarray(gt).astype(np.int64).reshape(-1)
  valid = (gt >= 0) & (gt < c)
  p = np.where((pred >= 0) & (pred < c), pred, c)
  index = gt[valid] * (c + 1) + p[valid]
  return np.bincount(index, minlength=c * (c + 1)).reshape(c, c + 1).astype(np.int64)


def iou_per_class(cm) -> np.ndarray:
  """Per-class IoU from a confusion matrix [C, C + 1] (or a plain square [C, C]).

  Returns:
    float64 [C]; NaN for classes absent from both ground truth and prediction.
  """
  cm = np.asarray(cm, np.float64)
  c = cm.shape[0]
  tp = np.diag(cm[:, :c])
  fp = cm[:, :c].sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  union = tp + fp + fn
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm) -> float:
  """mIoU: NaN-mean of `iou_per_class` (classes present in ground truth or prediction)."""
  iou = iou_per_class(cm)
  if np.all(np.isnan(iou)):
    return float("nan")
  return float(np.nanmean(iou))
