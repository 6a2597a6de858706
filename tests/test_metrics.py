"""Confusion matrices, IoU and mIoU on hand-worked examples; jnp equals NumPy."""

import jax
import numpy as np

from affinity_jax.ops import metrics


def test_hand_worked_example_with_ignore_and_absent_classes():
  # 4 classes; class 3 never appears in gt or pred.
  gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 3 * 0 + 2, 255]])
  # Pixels: (0,0) ok, (0,1) fn bg/fp 1, (1,1) ok, (1,1) ok, (2,2) ok, (2,0) fn 2/fp bg,
  # ignored, gt 1 pred 255 -> fn of class 1 only.
  cm = metrics.confusion_np(pred, gt, num_classes=4)
  assert cm.shape == (4, 5)
  assert cm.sum() == 7
  assert cm[1, 4] == 1
  iou = metrics.iou_per_class(cm)
  # bg: tp 1, fp 1 (gt 2 -> 0), fn 1 (gt 0 -> 1): 1/3.
  # class 1: tp 2, fp 1, fn 1 (pred 255): 2/4.
  # class 2: tp 1, fp 0, fn 1: 1/2.  class 3: absent -> nan.
  np.testing.assert_allclose(iou[:3], [1 / 3, 1 / 2, 1 / 2])
  assert np.isnan(iou[3])
  np.testing.assert_allclose(metrics.mean_iou(cm), (1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_class_only_predicted_counts_with_zero_iou():
  gt = np.array([0, 0, 0, 255])
  pred = np.array([0, 0, 2, 2])
  iou = metrics.iou_per_class(metrics.confusion_np(pred, gt, 3))
  np.testing.assert_allclose(iou[[0, 2]], [2 / 3, 0.0])
  assert np.isnan(iou[1])
  np.testing.assert_allclose(metrics.mean_iou(metrics.confusion_np(pred, gt, 3)), 1 / 3)


def test_perfect_and_empty():
  x = np.array([[0, 1], [2, 1]])
  assert metrics.mean_iou(metrics.confusion_np(x, x, 21)) == 1.0
  assert np.isnan(metrics.mean_iou(metrics.confusion_np(x, np.full_like(x, 255), 21)))


def test_square_matrix_accepted():
  cm = np.array([[3, 1], [0, 2]])
  np.testing.assert_allclose(metrics.iou_per_class(cm), [3 / 4, 2 / 3])


def test_jnp_equals_numpy_and_accumulates():
  rng = np.random.default_rng(0)
  pred = rng.integers(0, 21, (3, 17, 23))
  pred[rng.random(pred.shape) < 0.05] = 255
  gt = rng.integers(0, 21, (3, 17, 23))
  gt[rng.random(gt.shape) < 0.1] = 255
  dev = np.asarray(jax.jit(metrics.confusion)(pred, gt))
  host = metrics.confusion_np(pred, gt)
  np.testing.assert_array_equal(dev, host)
  summed = sum(metrics.confusion_np(pred[i], gt[i]) for i in range(3))
  np.testing.assert_array_equal(summed, host)
  assert host.sum() == (gt != 255).sum()
  # Dense reference: per class IoU by boolean masks.
  ref = []
  for c in range(21):
    keep = gt != 255
    tp = ((pred == c) & (gt == c)).sum()
    union = (((pred == c) | (gt == c)) & keep).sum()
    ref.append(tp / union)
  np.testing.assert_allclose(metrics.iou_per_class(host), ref)
