"""Generated scenes: the embedded default dataset, deterministic from a seed.

Each scene is a textured background (cool, low-saturation colours) with 1 to
`max_objects` objects drawn on top of each other (later ones occlude earlier
ones). Every object has

* a body: an ellipse of random size, aspect and rotation whose look (warm
  colour, diagonal stripes) comes from one distribution shared by all classes,
  so a body alone does not tell the class; and
* a part: a disk covering ~15% of the body's area, placed inside the body,
  whose saturated colour and stripe orientation are unique to the class.

A classifier therefore only needs the part: its CAM covers the part, and
affinity propagation has the rest of the body to recover - the failure mode
AffinityNet fixes. Masks are exact (the label id of the topmost object at each
pixel, 0 for background, never 255).

Classes use VOC label ids 1..K (K = `num_classes` <= 20), so every later stage
runs unchanged: `labels` is still a 20-wide multi-hot vector whose entries
K..19 are always 0. Rendering a scene needs no TFDS: `render_scene(seed,
index, params)`.
"""

import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from affinity_jax import constants
from affinity_jax.data import transforms, voc
from affinity_jax.errors import UserError

PART_FRACTION = 0.15       # Part area / body area.
MIN_PART_VISIBLE = 0.6     # Fraction of a part that must stay visible after occlusion.
MIN_BODY_VISIBLE = 0.4     # Same for the whole object.


@dataclasses.dataclass(frozen=True)
class SceneParams:
  """What a scene looks like. Defaults are the embedded default dataset."""
  image_size: int = 96
  num_classes: int = 5
  max_objects: int = 3

  def check(self) -> None:
    if not 1 <= self.num_classes <= constants.NUM_CLASSES:
      raise UserError(f"num_classes: {self.num_classes} not in 1..{constants.NUM_CLASSES}")
    if self.image_size < 32:
      raise UserError(f"image_size: {self.image_size} is below 32")
    if self.max_objects < 1:
      raise UserError(f"max_objects: {self.max_objects} is below 1")


def class_colour(label: int, num_classes: int) -> np.ndarray:
  """The part colour of label id 1..K: evenly spaced saturated hues, [3] float in 0..255."""
  hue = (label - 1) / num_classes
  return np.array(colorsys.hsv_to_rgb(hue, 0.95, 1.0)) * 255.0


def _hsv(rng, h, s, v) -> np.ndarray:
  rgb = colorsys.hsv_to_rgb(rng.uniform(*h) % 1.0, rng.uniform(*s), rng.uniform(*v))
  return np.array(rgb) * 255


def _background(rng, size: int) -> np.ndarray:
  """Cool-coloured smooth blotches plus fine noise, [S, S, 3] float."""
  c0 = _hsv(rng, (0.35, 0.65), (0.15, 0.35), (0.25, 0.45))
  c1 = _hsv(rng, (0.35, 0.65), (0.15, 0.35), (0.45, 0.65))
  coarse = rng.uniform(0, 1, (6, 6))
  blend = transforms.resize(coarse.astype(np.float32), (size, size), "bilinear")[..., None]
  noise = rng.normal(0, 8, (size, size, 1))
  return c0 * (1 - blend) + c1 * blend + noise


def _stripes(yy, xx, angle: float, period: float) -> np.ndarray:
  phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
  return (np.sin(phase) > 0).astype(np.float32)


def _place_object(rng, size, yy, xx):
  """Samples one object's geometry.

  Returns:
    (body [S,S] bool, part [S,S] bool, part_area float): the masks inside the
    image and the part's full area (it may extend past the image border).
  """
  r_major = rng.uniform(0.16, 0.32) * size
  r_minor = r_major * rng.uniform(0.55, 1.0)
  theta = rng.uniform(0, np.pi)
  cy, cx = rng.uniform(0.1, 0.9, 2) * size
  rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
  u = rot[0, 0] * (xx - cx) + rot[0, 1] * (yy - cy)
  v = rot[1, 0] * (xx - cx) + rot[1, 1] * (yy - cy)
  body = (u / r_major) ** 2 + (v / r_minor) ** 2 <= 1.0
  r_part = np.sqrt(PART_FRACTION * r_major * r_minor)
  # Part centre: uniform in the ellipse shrunk by the part radius (then clipped to the body).
  rad, ang = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
  pu = rad * np.cos(ang) * max(r_major - 1.1 * r_part, 0.0)
  pv = rad * np.sin(ang) * max(r_minor - 1.1 * r_part, 0.0)
  px, py = cx + rot[0, 0] * pu + rot[1, 0] * pv, cy + rot[0, 1] * pu + rot[1, 1] * pv
  part = ((yy - py) ** 2 + (xx - px) ** 2 <= r_part ** 2) & body
  return body, part, np.pi * r_part ** 2


def render_scene(seed: int, index: int, params: SceneParams = SceneParams()):
  """Renders scene `index` of the dataset with seed `seed`.

  Args:
    seed: dataset seed.
    index: scene index (any non-negative int; splits use disjoint index ranges).
    params: `SceneParams`.

  Returns:
    (image uint8 [S,S,3], mask uint8 [S,S] with label ids 0..K, labels uint8 [20]).
  """
  params.check()
  s = params.image_size
  rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  image = _background(rng, s)
  mask = np.zeros((s, s), np.uint8)
  owner = np.full((s, s), -1, np.int32)   # Which object is on top at each pixel.
  parts = []                              # Part masks inside the image, per object.
  bodies = []
  labels = np.zeros(constants.NUM_CLASSES, np.uint8)
  num = int(rng.integers(1, params.max_objects + 1))
  for _ in range(num):
    label = int(rng.integers(1, params.num_classes + 1))
    for _attempt in range(20):
      body_in, part_in, part_area = _place_object(rng, s, yy, xx)
      if part_in.sum() < MIN_PART_VISIBLE * part_area or part_area < 4:
        continue
      new_owner = np.where(body_in, len(bodies), owner)
      # Keep the scene only if every object (this one included) stays visible enough.
      visible = all((new_owner[p] == i).mean() >= MIN_PART_VISIBLE
                    for i, p in enumerate(parts + [part_in]))
      visible = visible and all((new_owner[b] == i).mean() >= MIN_BODY_VISIBLE
                                for i, b in enumerate(bodies + [body_in]))
      if visible:
        break
    else:
      continue  # Could not place this object without hiding another one: skip it.
    body_colour = _hsv(rng, (0.02, 0.12), (0.35, 0.6), (0.6, 0.85))
    body_tex = _stripes(yy, xx, rng.uniform(0, np.pi), rng.uniform(5, 8))
    body_look = body_colour * (0.85 + 0.15 * body_tex[..., None])
    part_angle = (label - 1) * np.pi / params.num_classes
    part_tex = _stripes(yy, xx, part_angle, 4.0)
    part_look = class_colour(label, params.num_classes) * (0.7 + 0.3 * part_tex[..., None])
    image = np.where(body_in[..., None], body_look, image)
    image = np.where(part_in[..., None], part_look, image)
    owner = np.where(body_in, len(bodies), owner)
    mask = np.where(body_in, label, mask).astype(np.uint8)
    bodies.append(body_in)
    parts.append(part_in)
    labels[label - 1] = 1
  if not bodies:
    # Every object was skipped (rare): render with the next index's randomness.
    return render_scene(seed, index + 1_000_003, params)
  image = np.clip(np.round(image + rng.normal(0, 3, image.shape)), 0, 255).astype(np.uint8)
  return image, mask, labels


def preview(seed: int = 0, params: SceneParams = SceneParams(), rows: int = 4,
            cols: int = 6) -> np.ndarray:
  """A grid of scenes (top) over their masks in the VOC palette (bottom), uint8 [H,W,3]."""
  s, gap = params.image_size, 4
  palette = constants.voc_palette()
  grid = np.full((rows * (2 * s + gap), cols * (s + gap), 3), 255, np.uint8)
  for r in range(rows):
    for c in range(cols):
      image, mask, _ = render_scene(seed, r * cols + c, params)
      y, x = r * (2 * s + gap), c * (s + gap)
      grid[y:y + s, x:x + s] = image
      grid[y + s:y + 2 * s, x:x + s] = palette[mask]
  return grid


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
  """Builder config: scene look, split sizes and seed (the name encodes them all)."""
  image_size: int = 96
  num_classes: int = 5
  max_objects: int = 3
  num_train: int = 400
  num_val: int = 100
  seed: int = 0

  @classmethod
  def make(cls, image_size=96, num_classes=5, max_objects=3, num_train=400, num_val=100,
           seed=0) -> "ScenesConfig":
    name = f"s{image_size}_k{num_classes}_o{max_objects}_n{num_train}-{num_val}_seed{seed}"
    return cls(name=name, image_size=int(image_size), num_classes=int(num_classes),
               max_objects=int(max_objects), num_train=int(num_train), num_val=int(num_val),
               seed=int(seed))

  @property
  def params(self) -> SceneParams:
    return SceneParams(self.image_size, self.num_classes, self.max_objects)


def split_indices(config: ScenesConfig) -> dict[str, range]:
  """Scene indices of each split (disjoint)."""
  return {"train": range(config.num_train),
          "val": range(config.num_train, config.num_train + config.num_val)}


class Scenes(voc.ArrayRecordBuilder):
  """Generated scenes with discriminative parts on shared-looking bodies."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ScenesConfig.make()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Generated scenes (affinity_jax embedded default).",
        features=voc.stored_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    self.builder_config.params.check()
    return {name: self._generate_examples(idx)
            for name, idx in split_indices(self.builder_config).items()}

  def _generate_examples(self, indices):
    cfg = self.builder_config
    for i in indices:
      image, mask, labels = render_scene(cfg.seed, i, cfg.params)
      image_id = f"scene_{i:06d}"
      yield image_id, {"image": voc.encode_png(image), "mask": voc.encode_png(mask),
                       "labels": labels, "id": image_id,
                       "height": cfg.image_size, "width": cfg.image_size}
