"""What a workdir stored for each image, read from its stores and scored against the truth.

The eval stage gives a workdir's stores (`affinity_jax.workdir.Workdir`), the examples
of the label splits by id (`data.sources.ById`: images and true masks) and the ids to
score; everything below reads one image at a time from them: its CAMs (`cam_maps/`),
its random-walk labels (`rw/`, `rw_crf/`) and its CRF labels (`crf/`).
"""

from typing import Iterator, Sequence

import numpy as np

from affinity_jax.data import sources
from affinity_jax.evaluation import confusion
from affinity_jax.evaluation import label_quality
from affinity_jax.evaluation import plots
from affinity_jax.ops import cam as cam_ops
from affinity_jax.ops import neighbors
from affinity_jax.progress import Progress
from affinity_jax.workdir import Workdir


def _mask(examples: sources.ById, image_id: str) -> np.ndarray:
  return examples[image_id]["mask"]


def cam_pairs(files: Workdir, examples: sources.ById,
              ids: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(CAMs float32 [H, W, 20], true mask [H, W]) per image, with a progress display."""
  for i in Progress(ids, desc="CAM", unit="img"):
    yield cam_ops.full_cams(*files.cams.load(i)), _mask(examples, i)


def confusions(files: Workdir, examples: sources.ById, ids: Sequence[str], *,
               cam_threshold: float, cam_sweep: Sequence[float] = (),
               dcrf: bool = False) -> dict[str, np.ndarray]:
  """Confusion matrices of the stored labels of `ids` against their true masks.

  Args:
    files: the workdir's stores.
    examples: the examples holding the true masks.
    ids: the images to score.
    cam_threshold, cam_sweep: the CAM-only rows (`confusion.cam_baselines`).
    dcrf: also score the labels after the dense CRF (`rw_crf/`).

  Returns:
    {"CAM": cm, "CAM (best t=..)": cm (with a sweep), "CAM+RW": cm,
    "CAM+RW+dCRF": cm (with `dcrf`)}, each int64 [21, 22].
  """
  cms = confusion.cam_baselines(cam_pairs(files, examples, ids), cam_threshold, cam_sweep)
  methods = {"CAM+RW": ((files.rw.load(i), _mask(examples, i)) for i in ids)}
  if dcrf:
    methods["CAM+RW+dCRF"] = ((files.rw_crf.load(i), _mask(examples, i)) for i in ids)
  cms.update(confusion.evaluate(methods, progress=True))
  return cms


def overlays(path: str, files: Workdir, examples: sources.ById, ids: Sequence[str],
             dcrf: bool = False) -> int:
  """`plots.overlay_grid` of `ids`: image, CAM, CAM+RW (and CAM+RW+dCRF), truth.

  Returns:
    The number of rows drawn.
  """
  rows = []
  for i in ids:
    example = examples[i]
    rows.append(dict(image=example["image"], cam=files.cams.load(i)[0],
                     pseudo=files.rw.load(i), gt=example["mask"], title=i,
                     **(dict(pseudo_crf=files.rw_crf.load(i)) if dcrf else {})))
  return plots.overlay_grid(path, rows)


def affinity_labels(files: Workdir, examples: sources.ById, ids: Sequence[str],
                    radius: int, border: str = "full") -> dict | None:
  """`label_quality.summarize` over the images of `ids` that have CRF labels (`crf/`),
  with the pairs of `aff.radius` and `aff.border`; None when none has."""
  have_crf = [i for i in ids if files.crf.exists(i)]
  if not have_crf:
    return None
  offsets = neighbors.half_disk_offsets(radius)
  return label_quality.summarize(
      label_quality.image_counts(*files.crf.load(i), _mask(examples, i), offsets, border)
      for i in Progress(have_crf, desc="affinity labels", unit="img"))
