"""Building blocks shared by the backbones and heads (NHWC everywhere).

- `conv`: an `nnx.Conv` with PyTorch-style symmetric padding (so strided
  convolutions produce ceil(H/stride) rows exactly like the reference).
- `FrozenBatchNorm`: inference-statistics BatchNorm whose four arrays live in a
  `FrozenStat` variable (not `nnx.Param`), so optimisers never see them.
- `make_norm`: picks frozen BatchNorm, trainable BatchNorm or GroupNorm by name.
- `dropout`: channel dropout (PyTorch `Dropout2d`) that is active only when
  `train=True` and takes an optional explicit key (see `docs/models.md`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from affinity_jax.errors import UserError

NORMS = ("frozen", "batch", "group")
# He/Kaiming normal (fan-in, gain sqrt 2, not truncated: like torch's kaiming_normal_).
# ("normal" is the untruncated normal in jax.nn.initializers.)
HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class FrozenStat(nnx.Variable):
  """Pretrained statistics and affine terms that are never trained."""


class FrozenBatchNorm(nnx.Module):
  """BatchNorm with fixed statistics: y = (x - mean) / sqrt(var + eps) * scale + bias."""

  def __init__(self, channels: int, *, eps: float = 1e-5):
    self.scale = FrozenStat(jnp.ones((channels,), jnp.float32))
    self.bias = FrozenStat(jnp.zeros((channels,), jnp.float32))
    self.mean = FrozenStat(jnp.zeros((channels,), jnp.float32))
    self.var = FrozenStat(jnp.ones((channels,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # Same behaviour in training and inference.
    mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
    return x * mul + (self.bias[...] - self.mean[...] * mul)


class BatchNorm(nnx.Module):
  """Trainable BatchNorm: batch statistics in training, running averages otherwise."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5, momentum: float = 0.9):
    self.bn = nnx.BatchNorm(channels, epsilon=eps, momentum=momentum, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.bn(x, use_running_average=not train)


class GroupNorm(nnx.Module):
  """GroupNorm (batch independent, so it trains from scratch with tiny batches)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, groups: int = 8, eps: float = 1e-5):
    self.gn = nnx.GroupNorm(channels, num_groups=min(groups, channels), epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    return self.gn(x)


def make_norm(kind: str, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.Module:
  """Returns a normalisation layer: `frozen`, `batch` (trainable) or `group`."""
  if kind == "frozen":
    return FrozenBatchNorm(channels, eps=eps)
  if kind == "batch":
    return BatchNorm(channels, rngs=rngs, eps=eps)
  if kind == "group":
    return GroupNorm(channels, rngs=rngs, eps=eps)
  raise UserError(f"norm: unknown normalisation {kind!r}, expected one of {NORMS}")


def conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1, dilation: int = 1,
         bias: bool = False, groups: int = 1, padding: int | None = None,
         kernel_init: Any = None) -> nnx.Conv:
  """A kxk convolution with symmetric padding `dilation * (k - 1) // 2` (PyTorch style)."""
  pad = dilation * (k - 1) // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_dilation=dilation, use_bias=bias, feature_group_count=groups,
                  rngs=rngs, kernel_init=kernel_init or HE_NORMAL)


def max_pool(x: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
  """Max pooling with -inf padding (PyTorch `MaxPool2d(k, stride, pad)`)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def dropout(layer: nnx.Dropout, x: jax.Array, *, train: bool, key: jax.Array | None) -> jax.Array:
  """Applies `layer` only when training; `key` (if given) overrides its own rng stream."""
  if not train or layer.rate == 0.0:
    return x
  return layer(x, deterministic=False, rngs=key)


def channel_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """PyTorch `Dropout2d`: drops whole channels (mask broadcast over H and W of NHWC)."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  """n independent keys from `key` (or n `None`s when no key is given)."""
  if key is None:
    return [None] * n
  return [jax.random.fold_in(key, i) for i in range(n)]


def _same_padding(n: int, k: int, stride: int, dilation: int) -> tuple[int, int, int]:
  """TF "SAME" padding along one axis: (before, after, output size)."""
  span = (k - 1) * dilation + 1
  out = -(-n // stride)
  total = max((out - 1) * stride + span - n, 0)
  return total // 2, total - total // 2, out


def _depthwise_geometry(shape, k, stride, dilation):
  top, bottom, ho = _same_padding(shape[1], k, stride, dilation)
  left, right, wo = _same_padding(shape[2], k, stride, dilation)
  return ((0, 0), (top, bottom), (left, right), (0, 0)), (ho, wo)


@jax.custom_vjp
def relu6(x: jax.Array) -> jax.Array:
  """`jax.nn.relu6` whose backward keeps its output instead of its input.

  Same values and gradients for every input but NaN (which gives 0 instead of NaN). The
  train step (`training.loop`) then passes the output, which the next layer reads
  anyway, to the backward pass instead of the depthwise convolution's output, whose k*k
  taps XLA would otherwise recompute there. Written as a select: as a clamp the Lite0
  step was ~8% slower (docs/models.md).
  """
  return jax.nn.relu6(x)


def _relu6_fwd(x):
  y = jnp.where(x > 0, jnp.minimum(x, 6.0), 0.0)
  return y, y


def _relu6_bwd(y, g):
  # 0 < relu6(x) < 6 exactly where 0 < x < 6: jax.nn.relu6's gradient mask.
  return (jnp.where((y > 0) & (y < 6), g, jnp.zeros_like(g)),)


relu6.defvjp(_relu6_fwd, _relu6_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
  """Depthwise convolution with TF "SAME" padding as a sum of shifted slices.

  A plain call (inference) reads the taps from a padded copy of x: one loop per layer,
  which compiles quickly for every new image size. Under differentiation (training, at
  one shape) the custom rule cuts the output into regions instead and never pads
  (`_tap_sum`): for Lite0's layers 2-4x faster per call, but 4-7x the compile time,
  which made the inference stages slower, as they compile once per image size
  (docs/models.md). Both give the same values up to float rounding.

  Args:
    x: [B, H, W, C].
    kernel: [k, k, 1, C] (`nnx.Conv`'s layout for `feature_group_count=C`).
    stride: spatial stride.
    dilation: kernel dilation.

  Returns:
    [B, ceil(H/stride), ceil(W/stride), C].
  """
  pads, out_hw = _depthwise_geometry(x.shape, kernel.shape[0], stride, dilation)
  return _tap_sum(jnp.pad(x, pads), kernel, stride, dilation, (0, 0), out_hw)


# Rows of the cotangent summed inside one elementwise fusion per kernel tap, and taps of
# a kernel row per fusion (see below; both measured in docs/models.md).
KERNEL_GRAD_MAX_ROWS = 32
KERNEL_GRAD_TAPS = 3


def _valid_outputs(n: int, k: int, stride: int, dilation: int, before: int, out: int):
  """Per tap along one axis: the first output index whose input lies inside [0, n), how
  many outputs do, and the input index of the first one (TF "SAME" geometry)."""
  spans = []
  for i in range(k):
    offset = i * dilation - before   # input index read by output 0
    first = max(0, -(-(-offset) // stride))
    last = min(out - 1, (n - 1 - offset) // stride)
    spans.append((first, last - first + 1, first * stride + offset) if last >= first else (0, 0, 0))
  return spans


def _cuts(spans, out: int) -> list[int]:
  """The output indices where the set of taps that read inside the input changes."""
  cuts = {0, out}
  for first, n, _ in spans:
    if n:
      cuts |= {first, first + n}
  return sorted(cuts)


def _tap_sum(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
             before: tuple[int, int], out_hw: tuple[int, int]) -> jax.Array:
  """sum_{i,j} kernel[i, j, 0] * x[b, h*s + i*d - top, w*s + j*d - left, c], reading
  zero outside x: a depthwise correlation, with `before` = (top, left) padding.

  Where taps read outside x, the output is cut into regions in which the same taps
  read inside it (up to 5 x 5 regions for a 5x5 kernel). Each region is a sum of plain
  strided slices of x and the regions are concatenated, so XLA writes the output once,
  one loop per region, and no padded copy of x is made. A caller that pads x itself
  (`before` = (0, 0)) gets one region: less code to compile, but the padded copy is
  written out before the taps read it, 2-4x the run time for Lite0's layers
  (docs/models.md).

  Args:
    x: [B, H, W, C].
    kernel: [k, k, 1, C].
    stride, dilation: the correlation's stride and kernel dilation.
    before: padding before the first row and column.
    out_hw: the output's (height, width).

  Returns:
    [B, *out_hw, C].
  """
  k, s = kernel.shape[0], stride
  rows = _valid_outputs(x.shape[1], k, s, dilation, before[0], out_hw[0])
  cols = _valid_outputs(x.shape[2], k, s, dilation, before[1], out_hw[1])
  row_cuts, col_cuts = _cuts(rows, out_hw[0]), _cuts(cols, out_hw[1])
  bands = []
  for r0, r1 in zip(row_cuts, row_cuts[1:]):
    band = []
    for c0, c1 in zip(col_cuts, col_cuts[1:]):
      out = None
      for i, (first_i, n_i, x_i) in enumerate(rows):
        if not first_i <= r0 < r1 <= first_i + n_i:
          continue
        for j, (first_j, n_j, x_j) in enumerate(cols):
          if not first_j <= c0 < c1 <= first_j + n_j:
            continue
          h0, w0 = x_i + (r0 - first_i) * s, x_j + (c0 - first_j) * s
          tap = jax.lax.slice(x, (0, h0, w0, 0),
                              (x.shape[0], h0 + (r1 - r0 - 1) * s + 1,
                               w0 + (c1 - c0 - 1) * s + 1, x.shape[3]), (1, s, s, 1))
          out = tap * kernel[i, j, 0] if out is None else out + tap * kernel[i, j, 0]
      if out is None:   # No tap reads inside x (an input smaller than the dilation).
        out = jnp.zeros((x.shape[0], r1 - r0, c1 - c0, x.shape[3]), x.dtype)
      band.append(out)
    bands.append(jnp.concatenate(band, axis=2))
  return jnp.concatenate(bands, axis=1)


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, k: int, stride: int, dilation: int,
                           pads) -> jax.Array:
  """The depthwise kernel gradient sum_{b,h,w} x[b, h*s + i*d - top, w*s + j*d - left, c]
  * g[b, h, w, c], over the outputs whose tap (i, j) reads inside x.

  Each tap reads x and g only where they overlap, so nothing is padded and the padding's
  zeros are never multiplied (a third of the taps' work for Lite0's dilation-4 layers at
  24x24). Per tap the products of up to `KERNEL_GRAD_MAX_ROWS` rows are added as one
  expression of strided slices, which XLA fuses into one loop that reads x and g where
  they lie, into a [B, groups, Wo, C] partial sum (zero outside the overlap). Up to
  `KERNEL_GRAD_TAPS` neighbouring taps of a row are stacked into one fusion, which
  reads their common rows of g once from cache, and reduced together. A reduction of
  each tap's product instead makes XLA copy every tap out first (its YNN reduction does
  not fuse slices): twice the memory traffic (docs/models.md).

  Args:
    x: [B, H, W, C], the unpadded input.
    g: [B, Ho, Wo, C], the output cotangent.
    k, stride, dilation: the convolution's kernel size, stride and dilation.
    pads: the convolution's padding, as from `_depthwise_geometry`.

  Returns:
    [k * k, C], taps in row-major order.
  """
  b, ho, wo, c = g.shape
  s = stride
  # A tap's nh overlapping rows are split into `groups` interleaved groups of `rows` rows:
  # term q holds rows q, q + rows, ... of the overlap; the last groups may lack it.
  groups = -(-ho // KERNEL_GRAD_MAX_ROWS)
  rows_out = []
  for h0, nh, r0 in _valid_outputs(x.shape[1], k, s, dilation, pads[1][0], ho):
    rows = -(-nh // groups)
    taps = []
    for w0, nw, c0 in _valid_outputs(x.shape[2], k, s, dilation, pads[2][0], wo):
      partial = jnp.zeros((b, groups, nw, c), g.dtype)
      for q in range(min(rows, nh) if nw else 0):
        n = -(-(nh - q) // rows)   # groups that have row q
        xs = jax.lax.slice(x, (0, r0 + q * s, c0, 0),
                           (b, r0 + (q + (n - 1) * rows) * s + 1, c0 + (nw - 1) * s + 1, c),
                           (1, rows * s, s, 1))
        gs = jax.lax.slice(g, (0, h0 + q, w0, 0), (b, h0 + q + (n - 1) * rows + 1, w0 + nw, c),
                           (1, rows, 1, 1))
        term = xs * gs
        if n < groups:
          term = jnp.pad(term, ((0, 0), (0, groups - n), (0, 0), (0, 0)))
        partial = term if q == 0 else partial + term
      taps.append(jnp.pad(partial, ((0, 0), (0, 0), (w0, wo - w0 - nw), (0, 0))))
    # Up to KERNEL_GRAD_TAPS neighbouring taps side by side ([B, groups, Wo, n, C]).
    for j in range(0, k, KERNEL_GRAD_TAPS):
      rows_out.append(jnp.sum(jnp.stack(taps[j:j + KERNEL_GRAD_TAPS], axis=3), axis=(0, 1, 2)))
  return jnp.concatenate(rows_out)


def _depthwise_fwd(x, kernel, stride, dilation):
  pads, out_hw = _depthwise_geometry(x.shape, kernel.shape[0], stride, dilation)
  y = _tap_sum(x, kernel, stride, dilation, (pads[1][0], pads[2][0]), out_hw)
  return y, (x, kernel)


def _depthwise_bwd(stride, dilation, residuals, g):
  # Autodiff of the slices turns each of the k*k taps into a full-size pad in the input
  # gradient and a full-size temporary per kernel tap: ~25 x 21 MB per 1152-channel
  # layer of Lite0, whose fresh pages the kernel must zero (docs/models.md).
  x, kernel = residuals
  k = kernel.shape[0]
  pads, out_hw = _depthwise_geometry(x.shape, k, stride, dilation)

  dkernel = _depthwise_kernel_grad(x, g, k, stride, dilation, pads).reshape(k, k, 1, x.shape[3])
  dkernel = dkernel.astype(kernel.dtype)

  # Input gradient: the transposed convolution, i.e. g dilated by the stride and
  # correlated with the flipped kernel, read where x was.
  span = (k - 1) * dilation
  (top, _), (left, _) = pads[1], pads[2]
  (ho, wo), s = out_hw, stride
  if s == 1:
    return _tap_sum(g, kernel[::-1, ::-1], 1, dilation, (span - top, span - left),
                    x.shape[1:3]), dkernel
  # Strided: g is padded only as far as the reads reach (padding it by the whole span on
  # both sides made XLA write out a map 5x the size of g; docs/models.md).
  # The reads start span - top rows (columns) before the dilated g and end at row
  # H - 1 + top (column W - 1 + left) of it.
  gp = jax.lax.pad(g, jnp.zeros((), g.dtype),
                   ((0, 0, 0), (span - top, x.shape[1] - 1 + top - (ho - 1) * s, s - 1),
                    (span - left, x.shape[2] - 1 + left - (wo - 1) * s, s - 1), (0, 0, 0)))
  return _tap_sum(gp, kernel[::-1, ::-1], 1, dilation, (0, 0), x.shape[1:3]), dkernel


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nnx.Module):
  """Depthwise kxk convolution with TF "SAME" padding, no bias (`depthwise_conv`).

  The kernel has `nnx.Conv`'s layout for `feature_group_count=C`: [k, k, 1, C].
  Shifted slices instead of XLA's grouped convolution: on CPU several times faster
  forward and backward (docs/models.md has the measurements); the backward is written
  out (`jax.custom_vjp`) so that XLA fuses each tap's work instead of copying taps out.
  """

  def __init__(self, channels: int, k: int, *, rngs: nnx.Rngs, stride: int = 1,
               dilation: int = 1):
    self.kernel = nnx.Param(HE_NORMAL(rngs.params(), (k, k, 1, channels), jnp.float32))
    self.k, self.stride, self.dilation = k, stride, dilation

  def __call__(self, x: jax.Array) -> jax.Array:
    return depthwise_conv(x, self.kernel[...], self.stride, self.dilation)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution as a product over channels: x [B,H,W,Cin], kernel [Cin,Cout]."""
  return jnp.einsum("bhwc,cd->bhwd", x, kernel)


def _pointwise_fwd(x, kernel):
  return pointwise_conv(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, g):
  # The weight gradient as x^T g on [B*H*W, C] matrices. Autodiff's dot_general leads
  # XLA's CPU layout assignment to transpose g instead, and that transposing copy
  # fuses into g's producer (a depthwise backward: k*k reads per element), whose
  # reads then stride through memory: ~280 ms instead of ~20 ms per Lite0 stage-6 block.
  x, kernel = residuals
  dkernel = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return jnp.einsum("bhwd,cd->bhwc", g, kernel), dkernel


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nnx.Module):
  """1x1 convolution, no bias, as a matrix product over channels (`pointwise_conv`).

  The kernel keeps `nnx.Conv`'s [1, 1, Cin, Cout] layout (weight files map onto it
  unchanged). On CPU XLA's convolution computes a 1x1 kernel's weight gradient
  several times slower than the same product as a `dot` (docs/models.md).
  `__call__(x [B, H, W, Cin]) -> [B, H, W, Cout]`.
  """

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, kernel_init: Any = None):
    self.kernel = nnx.Param((kernel_init or HE_NORMAL)(rngs.params(), (1, 1, cin, cout),
                                                       jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return pointwise_conv(x, self.kernel[0, 0])
