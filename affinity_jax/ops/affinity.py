"""Pixel-pair affinities of AffinityNet, their labels and the training loss.

Layout: affinities and pair labels are [B, K, H, W], entry [b, k, y, x] describing the
pair (p, p + o_k) with p = (y, x) and o_k the k-th forward offset
(`neighbors.half_disk_offsets`). Offsets must be concrete (NumPy), never traced.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax.constants import IGNORE
from affinity_jax.ops import neighbors


def pairwise_affinity(features: jnp.ndarray, offsets, chunk: int | None = None
                      ) -> jnp.ndarray:
  """W(p, p + o) = exp(-mean_d |f_p - f_{p+o}|) for every pixel and forward offset.

  Differentiable in `features` by a hand-written backward pass (`_flat_affinity`), which
  walks the same chunks as the forward.

  Args:
    features: [B, H, W, D] float.
    offsets: concrete int [K, 2] of (dy, dx).
    chunk: source pixels per step of the loop (see below); any value >= 1 gives the same
      result. Default: 256 on small maps (less memory), 2048 from 8192 pixels on (faster).

  Returns:
    [B, K, H, W] in the features' dtype; 0 where p + o lies outside the map.
  """
  return _pairwise(features, offsets, chunk, _flat_affinity)


def _pairwise(features, offsets, chunk, flat_affinity):
  """`pairwise_affinity` with `flat_affinity(flat [n, D], shifts, rows) -> [K, n]` as
  its loop (the benchmark passes the loop without its custom backward)."""
  offsets = np.asarray(offsets, np.int32).reshape(-1, 2)
  b, h, w, d = features.shape
  n = b * h * w
  if n == 0 or len(offsets) == 0:
    return jnp.zeros((b, len(offsets), h, w), features.dtype)
  # Pixels flattened over the batch: offset k is a shift by s_k rows of [n, D]. Pairs
  # that leave their image (past a row end or into the next image) are masked at the end.
  shifts = tuple(int(s) for s in offsets[:, 0] * w + offsets[:, 1])
  if chunk is None:
    chunk = 256 if n < 8192 else 2048
  out = flat_affinity(features.reshape(n, d), shifts, min(chunk, n))
  out = jnp.moveaxis(out.reshape(-1, b, h, w), 0, 1)
  return jnp.where(neighbors.pair_mask(offsets, h, w, "full")[None], out, 0)


def _geometry(shifts, n, size):
  """(lo, hi, chunk count): the reach of the shifts around a chunk, and the loop length."""
  return min(min(shifts), 0), max(max(shifts), 0), -(-n // size)


def _chunk_window(flat, j, size, lo, hi):
  """Chunk j's first source row (the last chunk overlaps its neighbour) and its window:
  rows start + lo .. start + size + hi of `flat`, zero outside it."""
  n = flat.shape[0]
  start = jnp.minimum(j * size, n - size)
  window = jnp.take(flat, start + lo + jnp.arange(size + hi - lo), axis=0, mode="fill",
                    fill_value=0)
  return start, window


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _flat_affinity(flat: jnp.ndarray, shifts: tuple[int, ...], size: int) -> jnp.ndarray:
  """[K, n] affinities of the rows of flat [n, D] with the rows s_k further on.

  A loop over chunks of `size` source rows, each reading one window of features (the
  chunk and its reach, zero outside the map): no copy of the whole feature map is ever
  made (extra memory O(size * D + K * n)), and the window stays in cache for the K
  offsets (2x faster than one pass over the whole map per offset at 125x94 on CPU).
  """
  n, d = flat.shape
  lo, hi, chunks = _geometry(shifts, n, size)
  mean_d = jnp.full((d,), 1.0 / d, jnp.float32)

  def one_chunk(j, out):
    start, window = _chunk_window(flat, j, size, lo, hi)
    src = window[-lo:size - lo]

    def one_offset(s):
      other = jax.lax.dynamic_slice_in_dim(window, s - lo, size)
      # The mean over D as a product with a vector of 1/D: XLA's matrix-vector kernel
      # reads the |difference| faster than its reduction does (1.8x at 125x94 on CPU).
      # HIGHEST keeps float32 on GPU/TPU (their default matmul precision is TF32/bf16).
      dist = jnp.dot(jnp.abs(src - other).astype(jnp.float32), mean_d,
                     precision=jax.lax.Precision.HIGHEST)
      return jnp.exp(-dist).astype(flat.dtype)

    return jax.lax.dynamic_update_slice_in_dim(
        out, jax.lax.map(one_offset, jnp.asarray(shifts)), start, axis=1)

  out = jnp.zeros((len(shifts), n), flat.dtype)
  return jax.lax.fori_loop(0, chunks, one_chunk, out)


def _flat_affinity_fwd(flat, shifts, size):
  out = _flat_affinity(flat, shifts, size)
  return out, (flat, out)


def _flat_affinity_bwd(shifts, size, residuals, g):
  """dW/df_p = -W sign(f_p - f_q) / D and dW/df_q = -dW/df_p for q = p + s.

  The same chunks as the forward; each accumulates its window's gradient (sources and
  their partners) and adds it to the map's. jax.grad through the forward loop took 1.8x
  as long (radius 12, [8, 24, 24, 448], 2-core CPU, alternated runs;
  `benchmarks.affinity_loss`). The sign at 0 is +1, as jax.grad of |x| has it, so the
  two agree to float rounding.
  """
  flat, out = residuals
  n, d = flat.shape
  lo, hi, chunks = _geometry(shifts, n, size)
  # c[k, p] = g W / D, the common factor of both ends' gradients (signs applied below).
  coef = g.astype(jnp.float32) * out.astype(jnp.float32) / d
  shift_arr = jnp.asarray(shifts)

  def one_chunk(j, grad):
    start, window = _chunk_window(flat, j, size, lo, hi)
    window = window.astype(jnp.float32)
    src = window[-lo:size - lo]
    # The last chunk overlaps the one before: its sources already done count once.
    fresh = (start + jnp.arange(size) >= j * size).astype(jnp.float32)
    c = jax.lax.dynamic_slice_in_dim(coef, start, size, axis=1) * fresh

    def one_offset(k, carry):
      acc, gw = carry
      s = shift_arr[k] - lo
      other = jax.lax.dynamic_slice_in_dim(window, s, size)
      term = jnp.where(src >= other, 1.0, -1.0) * c[k][:, None]
      gw = jax.lax.dynamic_update_slice_in_dim(
          gw, jax.lax.dynamic_slice_in_dim(gw, s, size) + term, s, axis=0)
      return acc - term, gw

    acc, gw = jax.lax.fori_loop(
        0, len(shifts), one_offset,
        (jnp.zeros((size, d), jnp.float32), jnp.zeros((size + hi - lo, d), jnp.float32)))
    gw = gw.at[-lo:size - lo].add(acc)
    # grad holds rows lo .. n + hi of the map, so the window starts at row `start`.
    return jax.lax.dynamic_update_slice_in_dim(
        grad, jax.lax.dynamic_slice_in_dim(grad, start, size + hi - lo) + gw, start, axis=0)

  grad = jnp.zeros((n + hi - lo, d), jnp.float32)
  grad = jax.lax.fori_loop(0, chunks, one_chunk, grad)
  return (grad[-lo:n - lo].astype(flat.dtype),)


_flat_affinity.defvjp(_flat_affinity_fwd, _flat_affinity_bwd)


def affinity_labels(label_map: jnp.ndarray, offsets, border: str = "full"
                    ) -> dict[str, jnp.ndarray]:
  """Pair labels from a label map at the feature resolution.

  Args:
    label_map: [B, h, w] integer, 0 = background, 1..20 = classes, 255 = ignore.
    offsets: concrete int [K, 2] of (dy, dx).
    border: 'full' (every pair inside the map) or 'reference' (sources in rows
      0..h-r, cols r-1..w-r only).

  Returns:
    dict of bool [B, K, h, w]: `bg_pos` (both ends background), `fg_pos` (both ends the
    same object class), `neg` (different labels); both ends must be < 255.
  """
  offsets = np.asarray(offsets)
  lab = jnp.asarray(label_map).astype(jnp.int32)
  _, h, w = lab.shape
  mask = neighbors.pair_mask(offsets, h, w, border)[None]
  other = jnp.moveaxis(neighbors.shift_channels(
      jnp.broadcast_to(lab[..., None], lab.shape + (len(offsets),)), offsets, fill=IGNORE),
      -1, 1)
  src = lab[:, None]
  known = mask & (src < IGNORE) & (other < IGNORE)
  same = src == other
  return dict(bg_pos=known & same & (src == 0),
              fg_pos=known & same & (src > 0),
              neg=known & ~same)


def affinity_loss(aff: jnp.ndarray, labels: dict[str, jnp.ndarray], border: str = "full",
                  offsets=None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The AffinityNet loss L = L_bg/4 + L_fg/4 + L_neg/2, counts over the whole batch.

  L_bg = -sum(bg_pos * log(W + 1e-5)) / (count + 1e-5), likewise L_fg, and
  L_neg = -sum(neg * log(1 + 1e-5 - W)) / (count + 1e-5).

  Args:
    aff: [B, K, h, w] affinities from `pairwise_affinity`.
    labels: dict from `affinity_labels`.
    border: the pair mask of this border mode is applied to the labels again, so a
      'reference' loss never sees a 'full' pair even if the labels were made with 'full'
      (the mask is idempotent for labels made with the same mode).
    offsets: concrete [K, 2]; default the half-disk whose size is K.

  Returns:
    (loss scalar float32, aux dict with `bg_loss`, `fg_loss`, `neg_loss`, `bg_count`,
    `fg_count`, `neg_count`).
  """
  _, k, h, w = aff.shape
  if offsets is None:
    offsets = neighbors.half_disk_offsets(neighbors.half_disk_radius(k))
  mask = neighbors.pair_mask(offsets, h, w, border)[None]
  aff = aff.astype(jnp.float32)
  terms, aux = {}, {}
  for name, logp in (("bg", jnp.log(aff + 1e-5)), ("fg", jnp.log(aff + 1e-5)),
                     ("neg", jnp.log(1.0 + 1e-5 - aff))):
    sel = (labels[f"{name}_pos" if name != "neg" else "neg"] & mask).astype(jnp.float32)
    count = jnp.sum(sel)
    terms[name] = -jnp.sum(sel * logp) / (count + 1e-5)
    aux[f"{name}_loss"], aux[f"{name}_count"] = terms[name], count
  loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
  return loss, aux
