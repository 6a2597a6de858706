"""Benchmark: the banded random walk against the reference's dense matrix power.

    python -m affinity_jax.benchmarks.propagation [--sizes 63x47 63x63 125x94]
        [--repeats 5] [--dim 448] [--out propagation.json]

For each feature grid: random features [1, H, W, D] and CAMs [1, H, W, 21], beta 8,
t 256, radius 5, border 'reference' (the reference's edge set, so all three agree).
  - banded:      `random_walk.propagate` as it runs (`jitted_propagate`: on CPU with
                 its compiler options), batch 1 and a batch of 16.
  - dense JAX:   the reference's method in jitted JAX: dense N x N A = W^beta (both
                 directions + self-loops), T = D^-1 A, 8 squarings, one product.
  - dense NumPy: the same in NumPy float32 (BLAS matmul), like psa's torch code.
Every timing is from features to propagated CAMs; compile is excluded (ahead-of-time
compiled, then one warm-up call for the banded walk), median of repeats, with
block_until_ready. Dense runs repeat at most `--dense-repeats` times (they take minutes);
the dense JAX method only runs up to `--dense-jax-max-nodes` pixels (its XLA:CPU matmuls
take over 20 minutes at 125x94) and is otherwise compiled for its memory only.
Peak memory: JAX = XLA's compiled memory_analysis() argument + output + temp bytes;
NumPy = inputs + tracemalloc peak of the call. Extra memory (what the method needs
beyond its inputs and output, as the spec's table of the reference's cost reports it):
JAX = temp bytes; NumPy = the tracemalloc peak; its ratio to the dense JAX method's is
per image (a batch's extra memory over its size). max|diff| is against the dense NumPy
result.

`run`, `markdown` and `figure` are what colab/propagation_benchmark.ipynb calls.
"""

import argparse
import math
import statistics
import time
import tracemalloc
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import io
from affinity_jax.benchmarks import timing
from affinity_jax.ops import affinity, neighbors, random_walk

RADIUS, BETA, T, CHANNELS = 5, 8, 256, 21
BORDER = "reference"


def _dense_jax(cams, feats):
  """psa's method in JAX for one image: dense A, T = D^-1 A, T^(2^8), then T x."""
  _, h, w, c = cams.shape
  n = h * w
  offs = neighbors.half_disk_offsets(RADIUS)
  aff = affinity.pairwise_affinity(feats, offs)[0]
  aff = jnp.where(neighbors.pair_mask(offs, h, w, BORDER), aff, 0.0) ** BETA
  idx = np.arange(n).reshape(h, w)
  src = np.broadcast_to(idx, aff.shape).reshape(-1)
  dst = np.stack([np.roll(idx, (-dy, -dx), (0, 1)) for dy, dx in offs]).reshape(-1)
  a = jnp.eye(n, dtype=jnp.float32)
  v = aff.reshape(-1)
  a = a.at[src, dst].add(v).at[dst, src].add(v)   # Masked pairs add 0.
  tm = a / jnp.sum(a, axis=1, keepdims=True)
  for _ in range(int(math.log2(T))):
    tm = tm @ tm
  return (tm @ cams[0].reshape(n, c)).reshape(1, h, w, c)


def _dense_numpy(cams, feats):
  """The same in NumPy float32."""
  _, h, w, c = cams.shape
  n = h * w
  offs = neighbors.half_disk_offsets(RADIUS)
  f = feats[0]
  fp = np.pad(f, ((RADIUS, RADIUS), (RADIUS, RADIUS), (0, 0)))
  a = np.eye(n, dtype=np.float32)
  idx = np.arange(n).reshape(h, w)
  for k, (dy, dx) in enumerate(offs):
    other = fp[RADIUS + dy:RADIUS + dy + h, RADIUS + dx:RADIUS + dx + w]
    v = np.exp(-np.abs(f - other).mean(-1)) ** BETA
    ys, xs = np.mgrid[0:h - RADIUS + 1, RADIUS - 1:w - RADIUS + 1].reshape(2, -1)
    s, d = idx[ys, xs], idx[ys + dy, xs + dx]
    a[s, d] = v[ys, xs]
    a[d, s] = v[ys, xs]
  tm = a / a.sum(axis=1, keepdims=True)
  for _ in range(int(math.log2(T))):
    tm = tm @ tm
  return (tm @ cams[0].reshape(n, c)).reshape(1, h, w, c)


def _banded(cams, feats):
  return random_walk.propagate(cams, feats, radius=RADIUS, beta=BETA, t=T, border=BORDER)


def _lower_banded(cams, feats):
  """`propagate` as it runs (on CPU with its compiler options), lowered."""
  return random_walk.jitted_propagate(jax.default_backend()).lower(
      cams, feats, radius=RADIUS, beta=BETA, t=T, border=BORDER)


def _run_jax(lowered, args, repeats, warmup):
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  sec, out = timing.time_call(lambda: compiled(*args), repeats, warmup)
  return sec, np.asarray(out), peak, mem.temp_size_in_bytes


def _run_numpy(args, repeats):
  times, peak, out = [], 0, None
  for _ in range(repeats):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = _dense_numpy(*args)
    times.append(time.perf_counter() - t0)
    peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
  # Inputs exist before the call: the traced peak is the extra memory.
  input_bytes = sum(a.nbytes for a in args)
  return statistics.median(times), out, peak + input_bytes, peak


METHODS = ("dense_numpy", "dense_jax", "banded")


def default_dense_jax_max_nodes() -> int | None:
  """5000 pixels on CPU, where XLA's dense matmuls take over 20 minutes at 125x94."""
  return 5000 if jax.default_backend() == "cpu" else None


def bench(h, w, dim, repeats, dense_repeats, batch, rng, methods=METHODS,
          dense_jax_max_nodes=None):
  """Rows of the table for one grid; `methods` may leave out the (slow) dense ones.

  Speed-ups, memory ratios and differences against a dense method are None when that
  method was not run (the banded results are then compared with each other only). Above
  `dense_jax_max_nodes` the dense JAX method is compiled for its memory but not run.
  """
  feats = rng.normal(size=(batch, h, w, dim)).astype(np.float32) * 0.05
  cams = rng.uniform(size=(batch, h, w, CHANNELS)).astype(np.float32)
  one = (jnp.asarray(cams[:1]), jnp.asarray(feats[:1]))
  many = (jnp.asarray(cams), jnp.asarray(feats))
  runs = []
  # The banded walk first, before minutes of dense BLAS on the same grid (on the shared
  # 2-core development machine, banded runs that came right after were 2-3x slower).
  banded_runs = []
  if "banded" in methods:
    one_run = _run_jax(_lower_banded(*one), one, repeats, warmup=True)
    many_run = _run_jax(_lower_banded(*many), many, max(1, repeats // 2), warmup=True)
    ref_bb = np.concatenate([one_run[1], np.asarray(_banded(*(x[1:] for x in many)))])
    banded_runs = [("banded JAX", 1, *one_run), ("banded JAX", batch, *many_run)]
  if "dense_numpy" in methods:
    runs.append(("dense NumPy", 1, *_run_numpy((cams[:1], feats[:1]), dense_repeats)))
  extra_dj = None
  if "dense_jax" in methods:
    lowered = jax.jit(_dense_jax).lower(*one)
    if dense_jax_max_nodes is None or h * w <= dense_jax_max_nodes:
      runs.append(("dense JAX", 1, *_run_jax(lowered, one, dense_repeats, warmup=False)))
    else:
      extra_dj = lowered.compile().memory_analysis().temp_size_in_bytes
  runs += banded_runs
  ref = {name: (sec, out, extra) for name, _, sec, out, _, extra in runs}
  sec_np, out_np, _ = ref.get("dense NumPy", (None, None, None))
  sec_dj, _, extra_run = ref.get("dense JAX", (None, None, None))
  extra_dj = extra_run or extra_dj
  rows = []
  for name, b, sec, out, peak, extra in runs:
    per_image = sec / b
    rows.append(dict(
        grid=f"{h}x{w}", nodes=h * w, method=name, batch=b, ms_per_image=per_image * 1e3,
        images_per_s=1.0 / per_image, peak_mb=peak / 2**20, extra_mb=extra / 2**20,
        speedup_vs_dense_jax=sec_dj / per_image if sec_dj else None,
        speedup_vs_dense_numpy=sec_np / per_image if sec_np else None,
        # Per image: a batch of 16 holds 16 images' walks, the dense method one.
        extra_memory_vs_dense_jax=extra / b / extra_dj if extra_dj else None,
        max_abs_diff_vs_dense_numpy=(float(np.abs(out[:1] - out_np).max())
                                     if out_np is not None else None),
        max_abs_diff_batch_vs_single=(float(np.abs(out - ref_bb).max()) if b > 1 else 0.0)))
  return rows


# What the propagation benchmark notebook calls ------------------------------------------


def run(sizes: Sequence[tuple[int, int]], *, dim: int = 448,
                          repeats: int = 5, dense_repeats: int = 1, batch: int = 16,
                          seed: int = 0) -> list[dict]:
  """Runs `bench` on each feature grid (H, W), for the notebook.

  Returns:
    Its rows, one per (grid, method): `nodes`, `method`, `batch`, `ms_per_image`,
    `peak_mb`, speed-ups and max|diff| against the dense NumPy result.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for h, w in sizes:
    rows += bench(h, w, dim, repeats, dense_repeats, batch, rng,
                  dense_jax_max_nodes=default_dense_jax_max_nodes())
  return rows


def _series(rows: Sequence[dict]) -> dict[str, list[dict]]:
  out = {}
  for r in rows:
    name = r["method"] + (f" (batch {r['batch']})" if r["batch"] > 1 else "")
    out.setdefault(name, []).append(r)
  return out


def figure(rows: Sequence[dict], title: str = ""):
  """Time per image and peak memory against grid nodes (log-log), one line per method.

  Args:
    rows: `run` rows.
    title: figure title (e.g. the device).

  Returns:
    A matplotlib `Figure` with two axes.
  """
  from matplotlib.figure import Figure

  if not rows:
    raise ValueError("figure needs at least one row")
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  for name, series in _series(rows).items():
    series = sorted(series, key=lambda r: r["nodes"])
    nodes = [r["nodes"] for r in series]
    style = "--" if name.startswith("dense") else "-"
    axes[0].plot(nodes, [r["ms_per_image"] for r in series], style, marker="o", label=name)
    axes[1].plot(nodes, [r["peak_mb"] for r in series], style, marker="o", label=name)
  for ax, what in zip(axes, ("time per image (ms)", "peak memory (MB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("grid nodes (H x W of the feature map)")
    ax.set_ylabel(what)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def markdown(rows: Sequence[dict]) -> str:
  """The rows as a Markdown table (grid, method, batch, ms/image, peak MB, speed-up)."""
  lines = ["| grid | nodes | method | batch | ms / image | peak MB | x dense JAX | max abs diff |",
           "|---|--:|---|--:|--:|--:|--:|--:|"]
  for r in rows:
    lines.append(f"| {r['grid']} | {r['nodes']} | {r['method']} | {r['batch']} | "
                 f"{r['ms_per_image']:.1f} | {r['peak_mb']:.1f} | "
                 f"{r['speedup_vs_dense_jax']:.1f} | {r['max_abs_diff_vs_dense_numpy']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", nargs="+", default=["63x47", "63x63", "125x94"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dense-repeats", type=int, default=1)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--dim", type=int, default=448, help="feature channels D")
  p.add_argument("--dense-jax-max-nodes", type=int, default=None,
                 help="larger grids only compile the dense JAX method (for its memory); "
                 "default 5000 on CPU (its matmuls take over 20 minutes at 125x94 "
                 "there), no limit on accelerators")
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated subset of " + ",".join(METHODS))
  p.add_argument("--out", default="propagation.json")
  a = p.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  head = (f"{'grid':>7} {'method':<12} {'B':>3} {'ms/img':>10} {'img/s':>8} {'peak MB':>9} "
          f"{'x dJAX':>8} {'x dNumPy':>9} {'extra MB':>9} {'xtr/dJAX':>9} {'max|diff|':>10}")
  print(f"radius {RADIUS}, beta {BETA}, t {T}, {CHANNELS} channels, D {a.dim}, "
        f"border {BORDER}, jax {jax.__version__} on {jax.devices()[0].platform}")
  print(head)
  for s in a.sizes:
    h, w = (int(v) for v in s.lower().split("x"))
    for r in bench(h, w, a.dim, a.repeats, a.dense_repeats, a.batch, rng,
                   tuple(a.methods.split(",")),
                   a.dense_jax_max_nodes or default_dense_jax_max_nodes()):
      rows.append(r)
      f = lambda v, spec: "-" if v is None else format(v, spec)
      print(f"{r['grid']:>7} {r['method']:<12} {r['batch']:>3} {r['ms_per_image']:>10.1f} "
            f"{r['images_per_s']:>8.2f} {r['peak_mb']:>9.1f} "
            f"{f(r['speedup_vs_dense_jax'], '.1f'):>8} "
            f"{f(r['speedup_vs_dense_numpy'], '.1f'):>9} "
            f"{r['extra_mb']:>9.1f} {f(r['extra_memory_vs_dense_jax'], '.4f'):>9} "
            f"{f(r['max_abs_diff_vs_dense_numpy'], '.2e'):>10}", flush=True)
  io.write_json(a.out, dict(radius=RADIUS, beta=BETA, t=T, channels=CHANNELS, dim=a.dim,
                            border=BORDER, device=str(jax.devices()[0]), rows=rows))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
