"""What the Colab demo notebook calls: run or open a workdir, explain images, draw panels.

  ctx = demo.run_pipeline("configs/scenes.py", "/tmp/scenes")   # resumes; instant if done
  demo.show([demo.explain(ctx, i) for i in demo.image_ids(ctx)[:3]])
  demo.show(demo.predict_image(ctx, my_uint8_rgb_image))

Every panel is an RGB uint8 image of the input's size, so a figure is a plain grid.
The networks and their computations are the stages' own (`Context.classifier`,
`Context.walker`, `Context.segmenter`, from `affinity_jax.inference`), so a panel of a
stored image shows exactly what the stage stored.
"""

import dataclasses
import functools
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from affinity_jax import config_lib
from affinity_jax import constants
from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import workdir as workdir_layout
from affinity_jax.data import transforms
from affinity_jax.errors import UserError
from affinity_jax.evaluation import plots
from affinity_jax.evaluation import report
from affinity_jax.inference import STRIDE
from affinity_jax.inference import cam
from affinity_jax.inference import walk
from affinity_jax.ops import affinity as aff_ops
from affinity_jax.ops import cam as cam_ops
from affinity_jax.stages import common
from affinity_jax.stages import pipeline

# Right and down neighbours: the edge map shows 1 - the weaker of the two affinities.
EDGE_OFFSETS = np.array([[0, 1], [1, 0]], np.int32)
CLASSIFIER_THRESHOLD = 0.5


@dataclasses.dataclass
class Panels:
  """The pictures of one image: name -> uint8 [H, W, 3], in display order."""
  title: str
  images: dict[str, np.ndarray]


def run_pipeline(config_spec: str = "configs/scenes.py", workdir: str = "/tmp/scenes",
                 overrides: Mapping[str, str] | None = None, mode: str = "all"
                 ) -> common.Context:
  """Runs (or resumes: finished stages are skipped) the pipeline of `config_spec`.

  Args:
    config_spec: `path/to/config.py[:arg]`, relative to the current folder or the repo.
    workdir: where every stage writes; a rerun with the same config is instant.
    overrides: dotted config key -> value as typed on the command line.
    mode: `all` or one stage name (`affinity_jax.stages.pipeline.MODES`).
  """
  config = config_lib.load_config(config_spec, dict(overrides or {}))
  return pipeline.run(config, config_spec, workdir, mode)


def open_workdir(workdir: str, run: bool = True) -> common.Context:
  """The context of a workdir written before (e.g. a copied checkpoint folder).

  Args:
    workdir: holds `config.json`, whose config (and config name) is used.
    run: run the stages whose outputs are missing (finished ones are skipped); False
      only opens the workdir and writes nothing (for reading a run still in progress).
      A workdir another run holds (`workdir.lock`) is only opened, with a note saying so.
  """
  name, config = workdir_layout.saved_config(workdir)
  if run:
    try:
      return pipeline.run(config, name, workdir)
    except workdir_layout.InUse as e:  # Another run writes it: only read.
      print(f"note: {e.where}: opened for reading only", flush=True)
  return common.Context(config, workdir, sharding.make_mesh())


def image_ids(ctx: common.Context, split: str | None = None) -> list[str]:
  """Ids of the evaluation split (default), whose images have every stored output."""
  return ctx.split(split or ctx.config.data.eval_split).ids()


@functools.lru_cache(maxsize=4)
def _classifier(ctx: common.Context) -> cam.Classifier:
  return ctx.classifier()


@functools.lru_cache(maxsize=4)
def _walker(ctx: common.Context) -> walk.Walker:
  return ctx.walker()


@functools.lru_cache(maxsize=4)
def _segmenter(ctx: common.Context):
  return ctx.segmenter() if ctx.config.seg.enabled else None


def _walk(ctx: common.Context, image: np.ndarray, cams: np.ndarray, keys: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
  """AffinityNet + random walk on one image, as the infer_rw stage runs them.

  Args:
    image: uint8 [H, W, 3].
    cams: [H, W, k] merged CAMs of label ids `keys` [k].

  Returns:
    (edges float32 [H, W] in [0, 1]: 1 - min affinity to the right/down neighbour,
     scores float32 [H, W, k + 1]: the walk's output, background first).
  """
  (scores,), (embedding,) = _walker(ctx)([image], [(cams, keys)], embeddings=True)
  aff = np.array(aff_ops.pairwise_affinity(jnp.asarray(embedding[None]), EDGE_OFFSETS)[0])
  aff[0, :, -1] = aff[1, -1, :] = 1.0            # No neighbour beyond the map: no edge.
  edges = 1.0 - aff.min(axis=0)                  # [h, w]
  padded = (embedding.shape[0] * STRIDE, embedding.shape[1] * STRIDE)
  edges = walk.scores_to_image(edges[..., None], image.shape[:2])[..., 0]
  return np.clip(edges, 0, 1), scores


def _heat(scores: np.ndarray) -> np.ndarray:
  """[H, W, k] -> [H, W]: max over channels, each channel divided by its own max."""
  if scores.shape[-1] == 0:
    return np.zeros(scores.shape[:2], np.float32)
  top = scores.reshape(-1, scores.shape[-1]).max(axis=0)
  return (scores / np.maximum(top, 1e-5)).max(axis=-1)


def _grey(values: np.ndarray, cmap: str = "gray_r") -> np.ndarray:
  """A [H, W] map in [0, 1] as a colour-mapped uint8 [H, W, 3] image."""
  from matplotlib import colormaps
  rgb = colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255
  return np.rint(rgb).astype(np.uint8)


def _common_panels(ctx: common.Context, image: np.ndarray, cams: np.ndarray,
                   keys: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """CAM, background score, learned affinities and walk panels; also the walk labels."""
  full = cam_ops.full_cams(cams, keys)
  bg = np.asarray(cam_ops.background_score(jnp.asarray(full), ctx.config.rw.alpha))
  edges, scores = _walk(ctx, image, cams, keys)
  panels = {
      "image": image,
      "CAM": plots.cam_overlay(image, full),
      "background score": plots.cam_overlay(image, bg),
      "learned affinities (edges)": _grey(edges),
      "random walk": plots.cam_overlay(image, _heat(scores[..., 1:])),
  }
  return panels, walk.labels(scores, keys)


def affinity_label_map(ctx: common.Context, image_id: str) -> np.ndarray:
  """The affinity labels of a whole image: uint8 [H, W], 0 bg, ids, 255 neutral.

  The stored CRF marginals of the uncropped image, padded to a multiple of 8, go through
  the training stage's `label_map_from_crf`; each cell is repeated over its 8 x 8 pixels.
  """
  la, ha, keys = ctx.files.crf.load(image_id)
  size = la.shape[:2]
  la, _ = transforms.pad_to_multiple(la, STRIDE, 0.0)
  ha, _ = transforms.pad_to_multiple(ha, STRIDE, 0.0)
  small = transforms.label_map_from_crf(la, ha, keys, STRIDE)
  return np.repeat(np.repeat(small, STRIDE, 0), STRIDE, 1)[:size[0], :size[1]]


def explain(ctx: common.Context, image_id: str) -> Panels:
  """Every step of the pipeline on one image of the label splits, from its stored outputs.

  Panels: image, CAM (max over classes), background score (1 - max CAM)^alpha, affinity
  labels (CRF; cream = neutral), learned affinities as edges, random-walk scores, the
  random-walk pseudo label, its dCRF refinement (when the config writes it), and the
  ground truth. The AffinityNet forward and the walk run again for the scores panels.
  """
  example = ctx.example(image_id)
  image = example["image"]
  cams, keys = ctx.files.cams.load(image_id)
  panels, _ = _common_panels(ctx, image, cams, keys)
  panels["affinity labels"] = plots.label_overlay(image, affinity_label_map(ctx, image_id))
  order = ["image", "CAM", "background score", "affinity labels",
           "learned affinities (edges)", "random walk"]
  panels = {k: panels[k] for k in order}
  panels["pseudo label (RW)"] = plots.label_overlay(image, ctx.files.rw.load(image_id))
  if ctx.files.rw_crf.exists(image_id):
    panels["pseudo label (RW+dCRF)"] = plots.label_overlay(
        image, ctx.files.rw_crf.load(image_id))
  panels["ground truth"] = plots.label_overlay(image, example["mask"])
  return Panels(f"{image_id}: {class_names(ctx, keys)}", panels)


def class_names(ctx: common.Context, keys: Sequence[int]) -> str:
  """The names of label ids `keys` as the reports write them ("class 1" for the scenes)."""
  names = constants.label_names(ctx.config.data.name)
  return ", ".join(names[int(k)] for k in keys) or "no class"


def classify(ctx: common.Context, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Image labels and merged CAMs of a new image, from the trained classifier.

  Args:
    image: uint8 [H, W, 3].

  Returns:
    (keys int [k]: label ids whose sigmoid at scale 1 exceeds 0.5, else the top-1;
     cams float32 [H, W, k]: the 8-pass merged CAMs of those classes).
  """
  classifier = _classifier(ctx)
  labels = classifier.labels(image, CLASSIFIER_THRESHOLD)
  cams = classifier.cams([dict(image=image, labels=labels)])[0]
  keys = np.flatnonzero(labels) + 1
  return keys, cams[..., keys - 1]


def predict_image(ctx: common.Context, image: np.ndarray, title: str = "your image"
                  ) -> Panels:
  """The trained networks on a new image: CAM, walk, pseudo label, segmentation net.

  Args:
    image: uint8 [H, W, 3] RGB (any size; grey or RGBA inputs are converted).
    title: the figure row's title (the predicted classes are appended).
  """
  image = as_rgb(image)
  keys, cams = classify(ctx, image)
  panels, pseudo = _common_panels(ctx, image, cams, keys)
  panels["pseudo label (RW)"] = plots.label_overlay(image, pseudo)
  segmenter = _segmenter(ctx)
  if segmenter is not None:
    panels["segmentation net"] = plots.label_overlay(image, segmenter(image))
  return Panels(f"{title}: {class_names(ctx, keys)}", panels)


def as_rgb(image) -> np.ndarray:
  """Any PIL image or array (grey, RGB, RGBA; uint8 or float in [0, 1]) -> uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    scale = 255.0 if image.size and image.max() <= 1.0 else 1.0
    image = np.clip(np.rint(image * scale), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise UserError(f"image: expected [H, W, 3] RGB, got shape {image.shape}")
  return np.ascontiguousarray(image[..., :3])


def load_image(path: str) -> np.ndarray:
  """A picture file as uint8 [H, W, 3] RGB."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise UserError(f"{path}: cannot read the image ({e})") from None


def new_scene(ctx: common.Context, seed: int = 12345, index: int = 0) -> np.ndarray:
  """A scene the networks never saw: rendered like the config's data with another seed."""
  from affinity_jax.data import scenes
  if ctx.config.data.name != "scenes":
    raise UserError(f"data.name: new_scene needs the scenes dataset, not "
                    f"{ctx.config.data.name!r}; load a picture with load_image instead")
  params = scenes.ScenesConfig.make(**ctx.config.data.scenes).params
  return scenes.render_scene(seed, index, params)[0]


def show(panels: Panels | Sequence[Panels], cell_in: float = 2.2):
  """Draws panels side by side, one row per image, with titles.

  Args:
    panels: one `Panels` or a list; rows may have different panel sets (names come
      from each row's own panels).
    cell_in: width of one panel in inches.

  Returns:
    A matplotlib `Figure` (object API; Jupyter displays it, `save_figure` writes it).
  """
  from matplotlib.figure import Figure

  rows = [panels] if isinstance(panels, Panels) else list(panels)
  if not rows:
    raise ValueError("show needs at least one Panels")
  cols = max(len(r.images) for r in rows)
  aspect = max(im.shape[0] / im.shape[1] for r in rows for im in r.images.values())
  row_in = cell_in * aspect + 0.6
  fig = Figure(figsize=(cols * cell_in, len(rows) * row_in))
  for r, row in enumerate(rows):
    for c, (name, im) in enumerate(row.images.items()):
      ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
      ax.imshow(im, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(name, fontsize=8)
      if c == 0:
        ax.set_ylabel(row.title, fontsize=8)
  fig.subplots_adjust(left=0.03, right=0.995, top=1 - 0.35 / (len(rows) * row_in),
                      bottom=0.01, wspace=0.04, hspace=0.3)
  return fig


save_figure = plots.save_figure   # (fig from `show`, path, dpi=100): a PNG, atomically.


def training_curves(ctx: common.Context) -> str:
  """The path of the run's training-curves picture, drawn first if the eval stage has not."""
  path = ctx.files.reports.path(report.CURVES_PNG)
  if not io.exists(path):
    plots.training_curves(path, ctx.files.training_logs())
  return path


def results_markdown(ctx: common.Context) -> str:
  """The evaluation table (`eval/results.md`) of the run."""
  return ctx.files.reports.markdown()
