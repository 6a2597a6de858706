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


# ImageNet-1k classes (indices into the 1000 outputs) that are a kind of each VOC class,
# for `cam.imagenet_prior`. person has no ImageNet class (the nearest are roles such as
# groom or scuba diver), so its CAM always comes from the trained classifier.
IMAGENET_CLASSES = {
    "aeroplane": (404, 895),                       # airliner, warplane
    "bicycle": (444, 671),                         # tandem, mountain bike
    "bird": tuple(range(7, 25)) + tuple(range(80, 101)) + tuple(range(127, 147)),
    "boat": (403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914),
    "bottle": (440, 720, 737, 898, 901, 907),      # beer, pill, pop, water bottle, jug, wine
    "bus": (654, 779, 874),                        # minibus, school bus, trolleybus
    "car": (407, 436, 468, 511, 609, 627, 656, 661, 717, 734, 751, 817),
    "cat": tuple(range(281, 286)),                 # tabby .. Egyptian cat
    "chair": (423, 559, 765, 857),                 # barber, folding, rocking chair, throne
    "cow": (345, 346, 347),                        # ox, water buffalo, bison
    "diningtable": (532,),                         # dining table
    "dog": tuple(range(151, 269)),                 # Chihuahua .. Mexican hairless
    "horse": (339, 603),                           # sorrel, horse cart
    "motorbike": (665, 670),                       # moped, motor scooter
    "person": (),
    "pottedplant": (738,),                         # pot, flowerpot
    "sheep": (348, 349),                           # ram, bighorn
    "sofa": (831,),                                # studio couch
    "train": (466, 547, 565, 705, 820, 829),       # bullet train .. streetcar
    "tvmonitor": (527, 664, 782, 851),             # desktop computer, monitor, screen, TV
}


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
