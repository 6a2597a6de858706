"""AffinityNet + banded random walk in inference mode: CAMs -> walk scores per pixel.

Images are batched by padding onto a canvas (`inference.canvas`); a `valid` mask keeps
the padding out of the walk, and with a mesh each batch is split over its devices.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax import defaults
from affinity_jax import sharding
from affinity_jax.data import transforms
from affinity_jax.errors import UserError
from affinity_jax.inference import STRIDE
from affinity_jax.inference import canvas as canvas_lib
from affinity_jax.inference import resize
from affinity_jax.labels import cam_files
from affinity_jax.ops import random_walk


class Walker:
  """A trained AffinityNet and the walk of `config.rw`, on batches of images.

  Args:
    model: a trained AffinityNet.
    rw_config: `config.rw` (alpha, radius, beta, t, border, flip, scales, normalize,
      batch_size).
    canvases: the input shapes images are padded onto (`inference.canvas`).
    mesh: optional device mesh each batch is split over (see `walker`).
  """

  def __init__(self, model: nnx.Module, rw_config,
               canvases: canvas_lib.Canvases = canvas_lib.Canvases(),
               mesh: jax.sharding.Mesh | None = None):
    self.walk, self.state = walker(model, rw_config, mesh)
    self.normalization = model.backbone.normalization
    self.alpha = rw_config.alpha
    self.normalize = _checked(rw_config.normalize)
    self.canvases = canvases
    self.devices = 1 if mesh is None else mesh.size
    # Batches go straight to their devices (no resharding program per shape).
    self.sharding = None if mesh is None else sharding.data_sharding(mesh)
    # Every call holds this many images (zero images fill the rest): one program per
    # canvas.
    self.batch_size = -(-rw_config.batch_size // self.devices) * self.devices

  def __call__(self, images: list[np.ndarray], cams: list[tuple[np.ndarray, np.ndarray]],
               embeddings: bool = False):
    """Walks images from their merged CAMs, those of one canvas `batch_size` at a time.

    Args:
      images: uint8 [H_i, W_i, 3].
      cams: (cams [H_i, W_i, k_i], keys [k_i] their label ids) per image.
      embeddings: also return each image's AffinityNet embedding.

    Returns:
      scores: float32 [H_i, W_i, k_i + 1] per image, background first (`label_ids`).
      With `embeddings`, also float32 [Hp_i / 8, Wp_i / 8, D] per image (Hp_i, Wp_i:
      the image size padded to a multiple of 8).
    """
    by_canvas = collections.defaultdict(list)
    for i, image in enumerate(images):
      by_canvas[self.canvases.canvas(*image.shape[:2])].append(i)
    scores, embedded = [None] * len(images), [None] * len(images)
    for group in by_canvas.values():
      for start in range(0, len(group), self.batch_size):
        chunk = group[start:start + self.batch_size]
        # The walk runs on the 1/8 grid: its canvas is a multiple of 8 even where the
        # CAMs' inputs are not padded (`Canvases.exact`).
        canvas = tuple(canvas_lib.round_up(n, STRIDE)
                       for n in self.canvases.at_scale(*images[chunk[0]].shape[:2]))
        out = self._walk([images[i] for i in chunk], [cams[i] for i in chunk], canvas)
        for i, s, e in zip(chunk, *out):
          scores[i], embedded[i] = s, e
    return (scores, embedded) if embeddings else scores

  def _walk(self, images, cams, canvas):
    """Scores and embeddings of images of one canvas (H, W), in one call."""
    xs, grids = [], []
    for image, (cam, keys) in zip(images, cams):
      x, _ = transforms.pad_to_multiple(transforms.normalize(image, self.normalization),
                                        STRIDE, 0.0)
      xs.append(x)
      grids.append(walk_input(cam, keys, self.alpha, x.shape[:2]))
    batch = batch_inputs(xs, grids, canvas, self.batch_size)
    out, embedding = self.walk(self.state,
                               *(jax.device_put(a, self.sharding) for a in batch))
    out, embedding = np.asarray(out), np.asarray(embedding)
    scores = [scores_to_image(normalize(out[b, :g.shape[0], :g.shape[1], :g.shape[2]],
                                        self.normalize), image.shape[:2])
              for b, (image, g) in enumerate(zip(images, grids))]
    return scores, [embedding[b, :g.shape[0], :g.shape[1]] for b, g in enumerate(grids)]


def refine(image: np.ndarray, cams, affinity_net, rw_config=None) -> np.ndarray:
  """The pseudo mask of one image in memory: its CAMs refined by AffinityNet's walk.

  The infer_rw stage's code path (`Walker`, then `labels`) for a single image, e.g. in a
  notebook: any method's CAMs in, a label map out.

    mask = affinity_jax.refine(image, {14: person_cam}, affinity_net)

  Args:
    image: uint8 [H, W, 3] RGB.
    cams: psa's form {class index 0..19: float [H, W] CAM normalised to [0, 1]}, or the
      CAM store's (cams float [H, W, k], keys int [k] VOC label ids 1..20).
    affinity_net: a trained AffinityNet (e.g. `Context.trained_model("aff")`, or one
      `load_pretrained` filled from psa's `res38_aff.pth`), or a `Walker` built once and
      reused (a new Walker compiles again).
    rw_config: the walk's settings (`config.rw`; e.g. a workdir's `ctx.config.rw`);
      default the reference's (alpha 16, beta 8, t 256, radius 5, our `full` border).
      Ignored when `affinity_net` is a `Walker`.

  Returns:
    uint8 [H, W] VOC label ids (0 background).

  Raises:
    UserError: CAMs of another size than the image, unknown class indices, NaNs, none.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise UserError(f"image: {image.dtype} {image.shape}, expected uint8 [H, W, 3] RGB")
  size = image.shape[:2]
  if isinstance(cams, dict):
    cams, keys = cam_files.from_dict(cams, size)
  else:
    cams, keys = cams
    indices = np.asarray(keys) - 1
    cams, keys = cam_files.from_dict(
        {int(c): np.asarray(cams)[..., i] for i, c in enumerate(indices)}, size)
  walker = (affinity_net if isinstance(affinity_net, Walker)
            else Walker(affinity_net, rw_config or defaults.base_config().rw))
  (scores,) = walker([image], [(cams, keys)])
  return labels(scores, keys)


NORMALIZE = ("none", "class")


def normalize(scores: np.ndarray, mode: str) -> np.ndarray:
  """Rescales an image's walk output (`config.rw.normalize`).

  The walk averages each pixel's scores with its neighbours', so a class's peak falls
  below the 1 its CAM was normalised to, and falls further the smaller the region it
  covers: a small object loses to the background around it. `class` divides each
  channel by its maximum over the image, as the CAMs were before the walk.

  Args:
    scores: [h, w, L] the walk's output on one image's feature grid.
    mode: `none` (the reference: unchanged) or `class`.

  Returns:
    [h, w, L].
  """
  if _checked(mode) == "class":
    return scores / (scores.max(axis=(0, 1), keepdims=True) + 1e-5)
  return scores


def _checked(mode: str) -> str:
  if mode not in NORMALIZE:
    raise UserError(f"rw.normalize: {mode!r} is not one of {NORMALIZE}")
  return mode


def label_ids(keys: np.ndarray) -> np.ndarray:
  """The label id of each walk channel: uint8 [k + 1], background (0) first."""
  return np.concatenate([[0], keys]).astype(np.uint8)


def labels(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """The walk's pseudo label: uint8 [H, W] label ids of the argmax of scores [H, W, k+1]."""
  return label_ids(keys)[np.argmax(scores, -1)]


def walk_input(cams: np.ndarray, keys: np.ndarray, alpha: float, padded: tuple[int, int]
               ) -> np.ndarray:
  """The walk's input on the feature grid: [Hp/8, Wp/8, k+1], background first.

  NumPy, so that images of many sizes compile nothing.

  Args:
    cams: [H, W, k] merged CAMs of the present classes (label ids `keys`).
    keys: [k] label ids.
    alpha: background power, M_bg = (1 - max_c M_c)^alpha at full resolution
      (`ops.cam.with_background`).
    padded: (Hp, Wp), the image size padded to a multiple of 8 (zeros beyond H, W).
  """
  cams = np.asarray(cams, np.float32)
  background = (np.float32(1) - cams.max(axis=-1, keepdims=True)) ** np.float32(alpha)
  full = np.concatenate([background, cams], axis=-1)
  full = np.pad(full, ((0, padded[0] - full.shape[0]), (0, padded[1] - full.shape[1]),
                       (0, 0)))
  h, w = padded[0] // STRIDE, padded[1] // STRIDE
  return full.reshape(h, STRIDE, w, STRIDE, -1).mean(axis=(1, 3))


def scores_to_image(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[h, w, L] walk output on an image's grid -> [H, W, L]: bilinear (half-pixel
  centres) to the image padded to a multiple of 8 (8h x 8w), cropped to (H, W).

  NumPy matrix products (`inference.resize`), so image sizes compile nothing.
  """
  h, w = scores.shape[:2]
  rows = resize.stretch(STRIDE * h, h, h)[:size[0]]
  cols = resize.stretch(STRIDE * w, w, w)[:size[1]]
  return np.einsum("Hh,hwl,Ww->HWl", rows, scores.astype(np.float32), cols,
                   optimize=True)


def walker(model, rw_config, mesh=None):
  """AffinityNet in inference mode followed by the random walk, split for jit.

  Args:
    model: a trained AffinityNet.
    rw_config: `config.rw` (radius, beta, t, border, flip, scales).
    mesh: optional device mesh: the parameters are replicated on it and each batch is
      split over its `data` axis (the batch must be a multiple of its size); every
      device walks its own images (`jax.shard_map`).

  Returns:
    (walk, state): `walk(state, x [B,H,W,3], cams [B,H/8,W/8,L], valid
    [B,H/8,W/8] bool, or None without a mesh) -> (scores [B,H/8,W/8,L], embedding
    [B,H/8,W/8,D])`
    and the model's nnx state. With `rw_config.flip` the embedding is the mean of the
    batch's and its mirror image's (mirrored back; W must be a multiple of 8 so that
    the cells line up). With several `rw_config.scales` it is the mean of the
    embeddings of the batch resized by each scale (bilinear), each resized back to
    the [H/8, W/8] grid; the walk itself always runs on that grid.
  """
  graphdef, state = nnx.split(model)
  r = rw_config
  propagate = lambda cams, emb, valid: random_walk.propagate(
      cams, emb, radius=r.radius, beta=r.beta, t=r.t, border=r.border, valid=valid)
  if mesh is not None and mesh.size == 1:
    mesh = None   # One device: `propagate` keeps its own jit (with the CPU options).
  if mesh is not None:
    batch = jax.sharding.PartitionSpec(sharding.DATA_AXIS)
    # Per-image work without collectives; check_vma=False lets the ops' loops start from
    # plain (unvarying) zeros.
    propagate = jax.jit(jax.shard_map(propagate, mesh=mesh, in_specs=(batch,) * 3,
                                      out_specs=batch, check_vma=False))
  embed, state = sharding.jit_over_batch(
      lambda state, x: nnx.merge(graphdef, state)(x, train=False)[0], state, mesh)
  scales = checked_scales(r.scales)

  def embed_at(state, x, scale):
    # The whole padded batch is resized, so each image keeps its place on the canvas;
    # the scaled canvas is a multiple of 8 and its cells are resized back onto the
    # canvas's own grid (half-pixel centres line up: cell k's centre stays at 8k + 4).
    grid = (x.shape[1] // STRIDE, x.shape[2] // STRIDE)
    if scale != 1.0:
      x = _resize(x, tuple(STRIDE * max(1, round(n * scale)) for n in grid))
    embedding = embed(state, x)
    if r.flip:
      embedding = (embedding + jnp.flip(embed(state, jnp.flip(x, 2)), 2)) / 2
    # Plain interpolation back: an antialiasing kernel's samples off the cell centres
    # would move each cell by up to 1/50 of a cell.
    return embedding if scale == 1.0 else _resize(embedding, grid, False)

  def walk(state, x, cams, valid=None):
    # Separate jits, the embedding staying on the device: on one CPU device `propagate`
    # compiles with its own (CPU) options.
    embedding = sum(embed_at(state, x, s) for s in scales) / len(scales)
    return propagate(cams, embedding, valid), embedding

  return walk, state


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize(x: jax.Array, size: tuple[int, int], antialias: bool = True) -> jax.Array:
  """Bilinear resize of [B, H, W, C] to [B, *size, C]."""
  return jax.image.resize(x, (x.shape[0],) + size + x.shape[3:], "bilinear",
                          antialias=antialias)


def checked_scales(scales) -> tuple[float, ...]:
  """`config.rw.scales` as floats, or a UserError naming the key."""
  try:
    out = tuple(float(s) for s in scales)
  except (TypeError, ValueError):
    out = ()
  if not out or not all(0 < s <= 4 for s in out):
    raise UserError(f"rw.scales: {scales!r}; expected one or more scales in (0, 4], "
                    "e.g. (1.0,) or (1.0, 1.5)")
  return out


def batch_inputs(images: list[np.ndarray], grids: list[np.ndarray], canvas: tuple[int, int],
                 slots: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads images of different sizes onto one canvas, as one batch for `walker`.

  Args:
    images: [Hp_i, Wp_i, 3] normalised images, sizes multiples of 8.
    grids: [Hp_i/8, Wp_i/8, L_i] walk inputs (`walk_input`).
    canvas: (H, W), multiples of 8 that hold every image.
    slots: the batch holds max(len(images), slots) images (zero images after them).

  Returns:
    (x [B, H, W, 3], grid [B, H/8, W/8, L], valid [B, H/8, W/8] bool), zeros and
    False beyond each image.
  """
  bh, bw = canvas
  if any(x.shape[0] > bh or x.shape[1] > bw for x in images):
    raise ValueError(f"an image does not fit the canvas {canvas}")
  # L = max L_i rounded up to 8 channels: the walk pads its state to 8 lanes anyway, and
  # batches with different class counts then share a compiled walk.
  num_ch = -(-max(g.shape[-1] for g in grids) // random_walk.LANES) * random_walk.LANES
  n = max(len(images), slots)
  x = np.zeros((n, bh, bw, 3), np.float32)
  grid = np.zeros((n, bh // STRIDE, bw // STRIDE, num_ch), np.float32)
  valid = np.zeros(grid.shape[:3], bool)
  for b, (image, g) in enumerate(zip(images, grids)):
    x[b, :image.shape[0], :image.shape[1]] = image
    grid[b, :g.shape[0], :g.shape[1], :g.shape[2]] = g
    valid[b, :g.shape[0], :g.shape[1]] = True
  return x, grid, valid
