"""Pictures for reports and notebooks: overlays as RGB arrays, confusion matrix, overlay
grid, training curves.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend switch, so notebooks keep their own backend) and written through `affinity_jax.io`.
"""

import io as _io
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from affinity_jax import io
from affinity_jax.constants import voc_palette


def label_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.6) -> np.ndarray:
  """Blends VOC palette colours of a label map onto an image.

  Background (0) keeps the image as it is so objects stand out; 255 (ignore) is drawn in
  its palette colour (cream).

  Args:
    image: uint8 [H, W, 3].
    label: int [H, W] label ids.
    alpha: weight of the label colour.

  Returns:
    uint8 [H, W, 3].
  """
  label = np.asarray(label).astype(np.int64)
  colours = voc_palette()[np.clip(label, 0, 255)].astype(np.float32)
  img = np.asarray(image, np.float32)
  blend = (1 - alpha) * img + alpha * colours
  out = np.where((label == 0)[..., None], img, blend)
  return np.rint(out).clip(0, 255).astype(np.uint8)


def cam_overlay(image: np.ndarray, cams: np.ndarray, alpha: float = 0.5,
                cmap: str = "jet") -> np.ndarray:
  """Blends a heat map of max_c CAM_c onto an image.

  Args:
    image: uint8 [H, W, 3].
    cams: float [H, W, k] (or [H, W]) class activation maps, roughly in [0, 1].
    alpha: weight of the heat map.

  Returns:
    uint8 [H, W, 3].
  """
  from matplotlib import colormaps

  cams = np.asarray(cams, np.float32)
  heat = cams.max(axis=-1) if cams.ndim == 3 else cams
  if heat.shape != image.shape[:2]:
    raise ValueError(f"CAM {heat.shape} and image {image.shape[:2]} differ in size")
  rgb = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
  out = (1 - alpha) * np.asarray(image, np.float32) + alpha * rgb
  return np.rint(out).clip(0, 255).astype(np.uint8)


def save_figure(fig, path: str, dpi: int = 100) -> None:
  """Writes a matplotlib `Figure` as a PNG (atomically)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  FigureCanvasAgg(fig)
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  io.write_bytes(path, buf.getvalue())


def confusion_plot(path: str, cm: np.ndarray, names: Sequence[str], *, title: str = "",
                   size_in: float = 9.0, dpi: int = 100) -> None:
  """Row-normalised confusion matrix (rows ground truth, columns prediction) as a PNG.

  Args:
    path: output .png, `size_in * dpi` pixels square.
    cm: [C, C + 1] or [C, C] counts; the extra column (prediction out of range) is shown
      as the last column, labelled 'ignore'.
    names: C class names.
  """
  from matplotlib.figure import Figure

  cm = np.asarray(cm, np.float64)
  c = cm.shape[0]
  rows = cm.sum(axis=1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  cols = list(names) + (["ignore"] if cm.shape[1] == c + 1 else [])
  fig = Figure(figsize=(size_in, size_in))
  ax = fig.add_axes([0.2, 0.2, 0.72, 0.72])
  im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
  ax.set_yticks(range(c), names, fontsize=8)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  for i in range(c):
    for j in range(cm.shape[1]):
      if norm[i, j] >= 0.01:
        ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=5,
                color="white" if norm[i, j] > 0.5 else "black")
  ax.set_title(title or "confusion (row-normalised, %)")
  fig.colorbar(im, cax=fig.add_axes([0.93, 0.2, 0.02, 0.72]))
  save_figure(fig, path, dpi)


def confusion_plots(directory: str, cms: Mapping[str, np.ndarray],
                    names: Sequence[str]) -> None:
  """`confusion_plot` of each method, as `<directory>/confusion_<slug>.png`.

  The slug is the method name's first word in lower case, "+" as "_" ("CAM+RW" ->
  `cam_rw`, "seg (val)" -> `seg`).
  """
  for name, cm in cms.items():
    slug = name.split(" ")[0].replace("+", "_").lower()
    confusion_plot(os.path.join(directory, f"confusion_{slug}.png"), cm, names, title=name)


def overlay_grid(path: str, rows: Iterable[Mapping[str, np.ndarray]], *, cell_in: float = 3.0,
                 dpi: int = 100) -> int:
  """A grid of overlays, one image per row: image / CAM / pseudo label(s) / ground truth.

  Args:
    path: output .png, `n_cols * cell_in * dpi` pixels wide and
        `(n * cell_in * a + 0.3) * dpi` high, a = the largest height/width ratio.
    rows: dicts with `image` uint8 [H, W, 3], `cam` float [H, W, k], `pseudo` [H, W] and
      `gt` [H, W] label maps, optionally `title` (str, e.g. the image id) and
      `pseudo_crf` [H, W] (CAM+RW+dCRF; a column after the walk's when every row has it).

  Returns:
    The number of rows drawn.
  """
  from matplotlib.figure import Figure

  rows = list(rows)
  if not rows:
    raise ValueError("overlay_grid needs at least one image")
  crf = all("pseudo_crf" in row for row in rows)
  heads = (("image", "CAM", "CAM+RW", "CAM+RW+dCRF", "ground truth") if crf
           else ("image", "CAM", "pseudo label", "ground truth"))
  cols = len(heads)
  aspect = max(np.shape(row["image"])[0] / np.shape(row["image"])[1] for row in rows)
  row_in, head_in = cell_in * aspect, 0.3
  height = len(rows) * row_in + head_in
  fig = Figure(figsize=(cols * cell_in, height))
  for r, row in enumerate(rows):
    image = np.asarray(row["image"], np.uint8)
    panels = [image, cam_overlay(image, row["cam"]), label_overlay(image, row["pseudo"])]
    if crf:
      panels.append(label_overlay(image, row["pseudo_crf"]))
    panels.append(label_overlay(image, row["gt"]))
    for c, panel in enumerate(panels):
      ax = fig.add_subplot(len(rows), cols, cols * r + c + 1)
      ax.imshow(panel)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(heads[c], fontsize=10)
      if c == 0 and "title" in row:
        ax.set_ylabel(str(row["title"]), fontsize=8)
  fig.subplots_adjust(left=0.03, right=0.995, top=1 - head_in / height, bottom=0.005,
                      wspace=0.02, hspace=0.02)
  save_figure(fig, path, dpi)
  return len(rows)


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
  """Mean of the last `window` values at each position (fewer at the start)."""
  sums = np.cumsum(np.concatenate([[0.0], values]))
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(ends - window, 0)
  return (sums[ends] - sums[starts]) / (ends - starts)


def training_curves(path: str, metrics: Mapping[str, str], *, cell_in: float = 3.5,
                    dpi: int = 100) -> list[str]:
  """Loss and learning rate against the step, one column per training stage, as a PNG.

  The loss is drawn per step (faint) and as a running mean over about 1/50 of the run.

  Args:
    path: output .png.
    metrics: {stage name: path of its metrics.jsonl} in display order; stages whose
      file is missing or empty are left out.

  Returns:
    The stages drawn (nothing is written when there is none).
  """
  from matplotlib.figure import Figure

  runs = {}
  for name, metrics_path in metrics.items():
    rows = [r for r in io.read_jsonl(metrics_path) if "step" in r and "loss" in r]
    if rows:
      runs[name] = rows
  if not runs:
    return []
  fig = Figure(figsize=(len(runs) * cell_in, 2 * cell_in * 0.7))
  axes = fig.subplots(2, len(runs), squeeze=False, sharex="col")
  for col, (name, rows) in enumerate(runs.items()):
    step = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], np.float64)
    top, bottom = axes[0, col], axes[1, col]
    top.plot(step, loss, color="tab:blue", alpha=0.3, linewidth=0.8)
    top.plot(step, _running_mean(loss, max(len(loss) // 50, 1)), color="tab:blue")
    top.set_title(name)
    top.grid(alpha=0.3)
    if "lr" in rows[0]:
      bottom.plot(step, [r.get("lr", np.nan) for r in rows], color="tab:orange")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    if col == 0:
      top.set_ylabel("loss")
      bottom.set_ylabel("learning rate")
  fig.tight_layout()
  save_figure(fig, path, dpi)
  return list(runs)
