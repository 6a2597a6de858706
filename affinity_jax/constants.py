"""PASCAL VOC 2012 label conventions shared by every stage; the one table of class names.

Label ids: 0 = background, 1..20 = the object classes below, 255 = ignore.
Classifier outputs and CAM channels are indexed 0..19 and map to label ids 1..20.
"""

import numpy as np

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = 20          # Object classes (classifier outputs).
NUM_LABELS = 21           # Background + object classes (segmentation labels).
IGNORE = 255
LABEL_NAMES = ("background",) + VOC_CLASSES   # Indexed by label id.


def label_names(dataset: str) -> tuple[str, ...]:
  """The name of each label id 0..20 in `dataset` ("voc12", or "scenes": "class 1", ...)."""
  if dataset == "scenes":
    return ("background",) + tuple(f"class {i}" for i in range(1, NUM_LABELS))
  return LABEL_NAMES


def voc_palette() -> np.ndarray:
  """The standard VOC colour map, [256, 3] uint8 (index 255 is (224, 224, 192))."""
  palette = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[i] = (r, g, b)
  return palette
