"""Pixel-pair neighbourhoods on a grid: offsets within a radius and which pairs count.

Offsets are (dy, dx) int pairs. The forward half-disk holds each undirected pair once;
the random walk uses both directions plus the self-loop.

Border modes decide which pairs (p, p + o) of an H x W map count:
  - 'full': every pair whose two ends are inside the map (and valid, if a mask is given).
  - 'reference': only sources p whose every forward offset p + o' lands inside, i.e.
    rows 0..H-r and cols r-1..W-r of the map; this reproduces psa's crop rule.
"""

import numpy as np
import jax.numpy as jnp

BORDERS = ("full", "reference")


def half_disk_offsets(radius: int) -> np.ndarray:
  """Forward half-disk of offsets within `radius`, in the reference order.

  Args:
    radius: the pair radius r (r = 5 in the paper); pairs have dy^2 + dx^2 < r^2.

  Returns:
    int32 [K, 2] of (dy, dx): (0, 1..r-1), then dy = 1..r-1 with dx = -(r-1)..r-1.
    K = 34 for r = 5.
  """
  r = int(radius)
  if r < 1:
    raise ValueError(f"radius must be >= 1, got {radius}")
  offs = [(0, dx) for dx in range(1, r)]
  offs += [(dy, dx) for dy in range(1, r) for dx in range(-(r - 1), r)
           if dy * dy + dx * dx < r * r]
  return np.asarray(offs, np.int32).reshape(-1, 2)


def half_disk_radius(count: int) -> int:
  """The radius whose forward half-disk has `count` offsets (inverse of the above)."""
  for r in range(1, 256):
    k = len(half_disk_offsets(r))
    if k == count:
      return r
    if k > count:
      break
  raise ValueError(f"no half-disk radius has {count} offsets")


def radius_of(offsets) -> int:
  """The smallest margin m with |dy|, |dx| <= m for every offset (r - 1 for a half-disk)."""
  offsets = np.asarray(offsets)
  return int(np.abs(offsets).max()) if offsets.size else 0


def pair_mask(offsets, height: int, width: int, border: str = "full",
              valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Which pairs (p, p + o) count, for every source p and forward offset o.

  Args:
    offsets: concrete int [K, 2] (dy, dx).
    height, width: the map size.
    border: 'full' or 'reference' (see the module docstring).
    valid: optional bool [B, H, W]; False marks padding. A pair needs both ends valid;
      with 'reference' a source also needs p + o' valid for every offset o', which for
      padding at the bottom/right gives each image its own reference region.

  Returns:
    bool [K, H, W] without `valid`, else [B, K, H, W].
  """
  if border not in BORDERS:
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
  offsets = np.asarray(offsets).reshape(-1, 2)
  inside = jnp.ones((height, width), bool) if valid is None else jnp.asarray(valid, bool)
  ends = shift_channels(jnp.broadcast_to(inside[..., None], inside.shape + (len(offsets),)),
                        offsets, fill=False)
  if border == "reference":
    masks = jnp.broadcast_to((inside & jnp.all(ends, axis=-1))[..., None], ends.shape)
  else:
    masks = inside[..., None] & ends
  return jnp.moveaxis(masks, -1, -3)


def shift_channels(x: jnp.ndarray, offsets, fill=0) -> jnp.ndarray:
  """Shifts each channel by its own offset: y[..., i, j, k] = x[..., i + dy_k, j + dx_k, k].

  One gather with static indices (34 separate pad-and-slice shifts of a map compile
  ~4x slower).

  Args:
    x: [..., H, W, K].
    offsets: concrete int [K, 2] of (dy, dx).
    fill: the value where i + dy_k, j + dx_k lies outside the map.

  Returns:
    [..., H, W, K] like x.
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  *lead, h, w, k = x.shape
  if len(offsets) != k:
    raise ValueError(f"{len(offsets)} offsets for {k} channels")
  m = radius_of(offsets)
  hp, wp = h + 2 * m, w + 2 * m
  flat = jnp.pad(x, [(0, 0)] * len(lead) + [(m, m), (m, m), (0, 0)],
                 constant_values=fill).reshape(*lead, hp * wp, k)
  src = (np.arange(h)[:, None, None] + m + offsets[:, 0]) * wp + (
      np.arange(w)[None, :, None] + m + offsets[:, 1])
  idx = jnp.broadcast_to(jnp.asarray(src.reshape(h * w, k), jnp.int32),
                         flat.shape[:-2] + (h * w, k))
  return jnp.take_along_axis(flat, idx, axis=-2).reshape(x.shape)
