"""Pixel-pair affinities of AffinityNet, their labels and the training loss.

Layout: affinities and pair labels are [B, K, H, W], entry [b, k, y, x] describing the
pair (p, p + o_k) with p = (y, x) and o_k the k-th forward offset
(`neighbors.half_disk_offsets`). Offsets must be concrete (NumPy), never traced.
"""

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax.constants import IGNORE
from affinity_jax.ops import neighbors


def pairwise_affinity(features: jnp.ndarray, offsets) -> jnp.ndarray:
  """W(p, p + o) = exp(-mean_d |f_p - f_{p+o}|) for every pixel and forward offset.

  Args:
    features: [B, H, W, D] float.
    offsets: concrete int [K, 2] of (dy, dx).

  Returns:
    [B, K, H, W] in the features' dtype; 0 where p + o lies outside the map.
  """
  offsets = np.asarray(offsets, np.int32).reshape(-1, 2)
  _, h, w, _ = features.shape
  m = neighbors.radius_of(offsets)
  fp = jnp.pad(features, ((0, 0), (m, m), (m, m), (0, 0)))
  inside = neighbors.pair_mask(offsets, h, w, "full")

  # One offset at a time (lax.map) so only one shifted window is alive: memory
  # O(B H W D + K B H W) instead of K shifted copies of the features.
  def one(args):
    (dy, dx), ok = args
    other = jax.lax.dynamic_slice(fp, (0, m + dy, m + dx, 0), features.shape)
    aff = jnp.exp(-jnp.mean(jnp.abs(features - other), axis=-1))
    return jnp.where(ok, aff, 0)

  out = jax.lax.map(one, (jnp.asarray(offsets), inside))
  return jnp.moveaxis(out, 0, 1)


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
  other = jnp.stack([neighbors.shift(lab, int(dy), int(dx), fill=IGNORE)
                     for dy, dx in offsets], axis=1)
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
