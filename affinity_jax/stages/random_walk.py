"""Stage 4 (`infer_rw`): AffinityNet features + banded random walk -> pseudo masks.

Images are batched (`config.rw.batch_size`) by padding to a common grid; a `valid` mask
keeps the padding out of the walk, and each batch is split over this host's devices.
Writes `rw/<id>.png` (VOC palette) and, with `config.rw.dcrf`, `rw_crf/<id>.png` (a
dense CRF on the walk's scores, in `config.crf.num_workers` processes while the next
batches walk).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from affinity_jax import io
from affinity_jax.data import transforms
from affinity_jax.labels import crf
from affinity_jax.ops import cam as cam_ops
from affinity_jax.ops import random_walk
from affinity_jax.stages import common
from affinity_jax.training import mesh as mesh_lib

STRIDE = 8


def walk_input(cams: np.ndarray, keys: np.ndarray, alpha: float, padded: tuple[int, int]
               ) -> np.ndarray:
  """The walk's input on the feature grid: [Hp/8, Wp/8, k+1], background first.

  Args:
    cams: [H, W, k] merged CAMs of the present classes (label ids `keys`).
    keys: [k] label ids.
    alpha: background power, M_bg = (1 - max_c M_c)^alpha at full resolution.
    padded: (Hp, Wp), the image size padded to a multiple of 8 (zeros beyond H, W).
  """
  full = np.asarray(cam_ops.with_background(jnp.asarray(cams), alpha))
  full = np.pad(full, ((0, padded[0] - full.shape[0]), (0, padded[1] - full.shape[1]),
                       (0, 0)))
  h, w = padded[0] // STRIDE, padded[1] // STRIDE
  return full.reshape(h, STRIDE, w, STRIDE, -1).mean(axis=(1, 3))


@functools.lru_cache(maxsize=None)
def _upsample(grid: tuple[int, int, int], padded: tuple[int, int]):
  return jax.jit(lambda x: jax.image.resize(x, padded + (grid[2],), "bilinear"))


def scores_to_image(scores: np.ndarray, padded: tuple[int, int], size: tuple[int, int]
                    ) -> np.ndarray:
  """[h, w, L] walk output -> [H, W, L]: bilinear to the padded size, then cropped."""
  up = _upsample(scores.shape, padded)(jnp.asarray(scores))
  return np.asarray(up)[:size[0], :size[1]]


def walker(model, rw_config, mesh=None):
  """AffinityNet in inference mode followed by the random walk, split for jit.

  Args:
    model: a trained AffinityNet.
    rw_config: `config.rw` (radius, beta, t, border).
    mesh: optional device mesh: the parameters are replicated on it and each batch is
      split over its `data` axis (the batch must be a multiple of its size); every
      device walks its own images (`jax.shard_map`).

  Returns:
    (walk, state): `walk(state, x [B,H,W,3], cams [B,H/8,W/8,L], valid
    [B,H/8,W/8] bool, or None without a mesh) -> (scores [B,H/8,W/8,L], embedding
    [B,H/8,W/8,D])`
    and the model's nnx state.
  """
  graphdef, state = nnx.split(model)
  r = rw_config
  propagate = lambda cams, emb, valid: random_walk.propagate(
      cams, emb, radius=r.radius, beta=r.beta, t=r.t, border=r.border, valid=valid)
  if mesh is not None and mesh.size == 1:
    mesh = None   # One device: `propagate` keeps its own jit (with the CPU options).
  if mesh is not None:
    batch = jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS)
    # Per-image work without collectives; check_vma=False lets the ops' loops start from
    # plain (unvarying) zeros.
    propagate = jax.jit(jax.shard_map(propagate, mesh=mesh, in_specs=(batch,) * 3,
                                      out_specs=batch, check_vma=False))
  embed, state = mesh_lib.jit_over_batch(
      lambda state, x: nnx.merge(graphdef, state)(x, train=False)[0], state, mesh)

  def walk(state, x, cams, valid=None):
    # Two jits, the embedding staying on the device: on one CPU device `propagate`
    # compiles with its own (CPU) options.
    embedding = embed(state, x)
    return propagate(cams, embedding, valid), embedding

  return walk, state


def batch_inputs(images: list[np.ndarray], grids: list[np.ndarray], bucket: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads images of different sizes into one batch for `walker`.

  Args:
    images: [Hp_i, Wp_i, 3] normalised images, sizes multiples of 8.
    grids: [Hp_i/8, Wp_i/8, L_i] walk inputs (`walk_input`).
    bucket: the batch's height and width are rounded up to a multiple of this, so
      many image sizes share a few compiled shapes.

  Returns:
    (x [B, H, W, 3], grid [B, H/8, W/8, L], valid [B, H/8, W/8] bool), zeros and
    False beyond each image.
  """
  bh = -(-max(x.shape[0] for x in images) // bucket) * bucket
  bw = -(-max(x.shape[1] for x in images) // bucket) * bucket
  # L = max L_i rounded up to 8 channels: the walk pads its state to 8 lanes anyway, and
  # batches with different class counts then share a compiled walk.
  num_ch = -(-max(g.shape[-1] for g in grids) // random_walk.LANES) * random_walk.LANES
  x = np.zeros((len(images), bh, bw, 3), np.float32)
  grid = np.zeros((len(images), bh // STRIDE, bw // STRIDE, num_ch), np.float32)
  valid = np.zeros(grid.shape[:3], bool)
  for b, (image, g) in enumerate(zip(images, grids)):
    x[b, :image.shape[0], :image.shape[1]] = image
    grid[b, :g.shape[0], :g.shape[1], :g.shape[2]] = g
    valid[b, :g.shape[0], :g.shape[1]] = True
  return x, grid, valid


def infer(ctx: common.Context) -> None:
  c = ctx.config
  model = ctx.trained_model("aff")
  mesh = mesh_lib.make_mesh(jax.local_devices())
  walk, state = walker(model, c.rw, mesh)
  norm = common.normalization(model)

  todo = [i for i in ctx.label_ids()
          if not os.path.exists(ctx.path("rw", i + ".png"))
          or (c.rw.dcrf and not os.path.exists(ctx.path("rw_crf", i + ".png")))]

  def walked():
    """Walks the images in batches, writes rw/<id>.png, yields the dense-CRF jobs."""
    for start in range(0, len(todo), c.rw.batch_size):
      chunk = todo[start:start + c.rw.batch_size]
      items = [_prepare(ctx, image_id, norm) for image_id in chunk]
      x, grid, valid = (mesh_lib.pad_batch(a, mesh.size) for a in batch_inputs(
          [it["x"] for it in items], [it["grid"] for it in items], c.data.infer_pad))
      out, _ = walk(state, jnp.asarray(x), jnp.asarray(grid), jnp.asarray(valid))
      out = np.asarray(out)
      for b, it in enumerate(items):
        gh, gw, gc = it["grid"].shape
        scores = scores_to_image(out[b, :gh, :gw, :gc], it["padded"], it["image"].shape[:2])
        io.save_label_png(ctx.path("rw", it["id"] + ".png"),
                          it["keys"][np.argmax(scores, -1)])
        yield ctx.path("rw_crf", it["id"] + ".png"), it["image"], scores, it["keys"]

  with tqdm(total=len(todo), desc="infer_rw", disable=None) as bar:
    if c.rw.dcrf:
      # The CRF runs in the CRF worker processes while the next batches walk.
      work = functools.partial(crf.label_png, unary_weight=c.rw.dcrf_unary_weight)
      crf.map_jobs(work, walked(), c.crf.num_workers, lambda _: bar.update(1))
    else:
      for _ in walked():
        bar.update(1)
  common.mark_finished(ctx, "rw")


def _prepare(ctx: common.Context, image_id: str, norm: str) -> dict:
  example = ctx.example(image_id)
  image = example["image"]
  x, _ = transforms.pad_to_multiple(transforms.normalize(image, norm), STRIDE, 0.0)
  cams, keys = common.load_cams(ctx.path("cam_maps", image_id + ".npz"))
  padded = x.shape[:2]
  return dict(id=image_id, image=image, x=x, padded=padded,
              grid=walk_input(cams, keys, ctx.config.rw.alpha, padded),
              keys=np.concatenate([[0], keys]).astype(np.uint8))
