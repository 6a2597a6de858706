"""The random walk of AffinityNet as a banded product: T^t x without an N x N matrix.

T = D^-1 A with A[i, j] = W_ij^beta over both directions of every pair within the radius
and A[i, i] = 1 (self-loops), D the row sums. psa builds T densely and squares it
log2(t) times (O(N^3) time, O(N^2) memory); here each of the t steps is a sum over the
2K + 1 neighbours of every pixel (O(t N K C) time, O(N K) memory) with the same result:
out_j = sum_i T[j, i] x_i.

Neighbour n of pixel p is p + walk_offsets(offsets)[n]: n = 0 is p itself, 1..K the forward
offsets, K+1..2K their negatives. Offsets must be concrete (NumPy), never traced.

The walk state is [B, H + 2m, W + 2m, C'] (m the largest |offset|, zero margins, C padded
to whole vector registers): every neighbour is then a static slice of the state, and the
whole step (2K + 1 slices, products, sum) is a single fused loop. docs/ops.md lists the
measured reasons for this layout and the ones tried and dropped.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax.ops import neighbors
from affinity_jax.ops.affinity import pairwise_affinity

LANES = 8  # float32 lanes of a 256-bit vector register; the walk pads channels to these

# XLA:CPU vectorises with 256-bit registers by default; on AVX-512 CPUs, 512-bit ones make
# the walk faster. Either way the walk runs its channels in groups of one register each
# (`CPU_GROUP`): a step then computes one vector per pixel and reads each weight straight
# into the product. With more channels per group the step's 2K + 1 weight broadcasts are
# hoisted out of the loop over the group's vectors and spilled to the stack (AVX2: 21
# channels in one group 1.25x slower than groups of 8; docs/ops.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def cpu_vector_lanes(cpuinfo: str | None = None, xla_flags: str | None = None) -> int:
  """float32 lanes of the widest vector XLA:CPU emits here: 16 with AVX-512, else 8.

  Args:
    cpuinfo: the text of /proc/cpuinfo (default: read it; 8 lanes when unreadable).
    xla_flags: the XLA_FLAGS value (default: the environment's); an
      `--xla_cpu_max_isa` below AVX-512 (e.g. AVX2) caps the vectors at 256 bits.
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  capped = [flag.split("=", 1)[1].upper() for flag in xla_flags.split()
            if flag.startswith("--xla_cpu_max_isa=")]
  if capped and not capped[-1].startswith(("AVX512", "AMX")):
    return LANES
  return 2 * LANES if " avx512f" in cpuinfo else LANES


CPU_GROUP = cpu_vector_lanes()


def walk_offsets(offsets) -> np.ndarray:
  """[2K + 1, 2]: the self offset (0, 0), the forward offsets, then their negatives."""
  offsets = np.asarray(offsets, np.int32).reshape(-1, 2)
  return np.concatenate([np.zeros((1, 2), np.int32), offsets, -offsets])


def transition_weights(aff: jnp.ndarray, offsets, beta: float = 8, border: str = "full",
                       valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Turns forward affinities into the banded rows of T = D^-1 W^beta.

  Args:
    aff: [B, K, H, W] forward affinities W(p, p + o_k) (as `pairwise_affinity` gives).
    offsets: concrete int [K, 2], the forward offsets of `aff`.
    beta: the Hadamard power (8 in the paper); a Python int uses exact integer powers.
    border: 'full' or 'reference' (`neighbors.pair_mask`): which pairs carry an edge.
    valid: optional bool [B, H, W]; invalid (padding) pixels have no edges, only their
      self-loop, so they neither send nor receive mass and keep their own value.

  Returns:
    float32 [B, H, W, 2K + 1]: entry [b, p, n] = T[p, p + walk_offsets(offsets)[n]];
    the entries of each pixel sum to 1. Pixel-major, so a step reads each pixel's
    weights from one place (1.1x faster on CPU than one plane per neighbour).
  """
  offsets = np.asarray(offsets)
  h, w = aff.shape[-2:]
  mask = neighbors.pair_mask(offsets, h, w, border, valid)
  if mask.ndim == 3:
    mask = mask[None]
  fwd = jnp.moveaxis(jnp.where(mask, aff.astype(jnp.float32), 0.0) ** beta, 1, -1)
  # The backward edge p -> p - o is the forward edge (p - o) -> p, stored at p - o.
  back = neighbors.shift_channels(fwd, -offsets)
  rows = jnp.concatenate([jnp.ones(fwd.shape[:-1] + (1,), fwd.dtype), fwd, back], axis=-1)
  return rows / jnp.sum(rows, axis=-1, keepdims=True)


def apply_transition(weights: jnp.ndarray, x: jnp.ndarray, offsets, t: int,
                     group: int | None = None) -> jnp.ndarray:
  """x <- T x, t times, with T given by its banded rows.

  Args:
    weights: [B, H, W, 2K + 1] from `transition_weights`.
    x: [B, H, W, C] values to propagate (e.g. CAMs).
    offsets: concrete int [K, 2], the forward offsets `weights` was built with.
    t: number of steps >= 0 (0 returns x); a Python int, or a traced int scalar so one
      compiled function serves every t.
    group: channels walked together (default: all). One vector register's lanes
      (`CPU_GROUP`: 16 with AVX-512 and `CPU_COMPILER_OPTIONS`, else 8) is the fastest
      choice on a CPU.

  Returns:
    float32 [B, H, W, C], out = T^t x.
  """
  static_t = isinstance(t, (int, np.integer))
  if static_t and t < 0:
    raise ValueError(f"t must be >= 0, got {t}")
  b, h, w, c = x.shape
  nbrs = walk_offsets(offsets)
  if weights.shape != (b, h, w, len(nbrs)):
    raise ValueError(f"weights {weights.shape} do not fit x {x.shape} and "
                     f"{len(nbrs)} neighbours")
  x = x.astype(jnp.float32)
  if static_t and t == 0:
    return x
  m = neighbors.radius_of(offsets)
  # Channels last, in groups padded to whole 8-lane vectors: XLA then vectorises over
  # channels and loads each weight once per pixel for the whole group (2.4x faster on
  # CPU than channels first, which loads a weight for every product).
  wts = weights.astype(jnp.float32)[..., None]
  sizes = [min(group or c, c - c0) for c0 in range(0, c, group or c)]
  groups = [jnp.pad(x[..., c0:c0 + g], ((0, 0), (m, m), (m, m), (0, -g % LANES)))
            for c0, g in zip(np.cumsum([0] + sizes[:-1]), sizes)]

  def step(s):
    terms = [wts[:, :, :, n] * s[:, m + dy:m + dy + h, m + dx:m + dx + w]
             for n, (dy, dx) in enumerate(nbrs)]
    # A balanced sum gives XLA independent products (a chain of 2K adds is ~1.4x slower).
    while len(terms) > 1:
      terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
               for i in range(0, len(terms), 2)]
    return jnp.pad(terms[0], ((0, 0), (m, m), (m, m), (0, 0)))

  def step_all(states):
    return [step(g) for g in states]

  def two_steps(_, states):
    # Two steps per iteration, kept apart by the barrier (fused, the second would
    # recompute the first 2K + 1 times): the loop then ping-pongs between two buffers
    # instead of copying the state back every step (1.3x faster on CPU).
    return step_all(jax.lax.optimization_barrier(step_all(states)))

  groups = jax.lax.fori_loop(0, t // 2, two_steps, groups)
  if static_t:
    groups = step_all(groups) if t % 2 else groups
  else:
    groups = jax.lax.cond(t % 2 == 1, step_all, lambda s: s, groups)
  return jnp.concatenate([s[:, m:m + h, m:m + w, :g] for s, g in zip(groups, sizes)],
                         axis=-1)


def propagate(cams: jnp.ndarray, features: jnp.ndarray, *, radius: int = 5,
              beta: float = 8, t: int = 256, border: str = "full",
              valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Random-walk propagation of CAMs with AffinityNet features: T^t vec(cams).

  Jitted (compiled once per shape and static argument); on CPU with
  `CPU_COMPILER_OPTIONS` and channel groups of `CPU_GROUP`. Called inside another jit,
  it is traced into that one and walks all channels as one group.

  Args:
    cams: [B, H, W, C] maps on the feature grid (e.g. 21 channels, background first).
    features: [B, H, W, D] AffinityNet embedding.
    radius: pair radius (pairs with dy^2 + dx^2 < radius^2).
    beta: Hadamard power of the affinities.
    t: number of walk steps (any int >= 0; 0 is the identity).
    border: 'full' (every pair inside the map, default) or 'reference' (psa's rule).
    valid: optional bool [B, H, W], False on the padding of images smaller than the
      batch; such pixels are isolated and returned unchanged.

  Returns:
    float32 [B, H, W, C].
  """
  platform = None if isinstance(cams, jax.core.Tracer) else _platform(cams)
  return jitted_propagate(platform)(cams, features, radius=radius, beta=beta, t=t,
                                    border=border, valid=valid)


def jitted_propagate(platform: str | None = None):
  """The jitted function `propagate` runs on `platform` ('cpu', 'gpu', 'tpu' or None).

  Its `lower(...)` gives the compiled walk for ahead-of-time compilation or memory
  analysis (benchmarks); arguments as `propagate`'s.
  """
  return _JITTED_CPU if platform == "cpu" else _JITTED


def propagate_body(cams, features, *, radius, beta, t, border, valid=None, group=None):
  """`propagate` unjitted (arguments as its, `group` as `apply_transition`'s): for a
  caller that jits it with other static arguments, e.g. beta traced."""
  offsets = neighbors.half_disk_offsets(radius)
  aff = pairwise_affinity(features, offsets)
  weights = transition_weights(aff, offsets, beta, border, valid)
  return apply_transition(weights, cams, offsets, t, group)


def _platform(x) -> str:
  if isinstance(x, jax.Array):
    return next(iter(x.devices())).platform
  return jax.default_backend()


_STATIC = ("radius", "beta", "t", "border")
_JITTED = jax.jit(propagate_body, static_argnames=_STATIC)
_JITTED_CPU = jax.jit(functools.partial(propagate_body, group=CPU_GROUP),
                      static_argnames=_STATIC, compiler_options=CPU_COMPILER_OPTIONS)
