"""Benchmark: AffinityNet's pair affinities and their gradient, as train_aff takes them.

    python -m affinity_jax.benchmarks.affinity_loss [--grids 24x24 56x56] [--batch 8]
        [--dim 448] [--radii 5,12] [--repeats 5] [--out affinity_loss.json]

For each grid and radius: random embeddings [B, H, W, D] and the half-disk offsets.
  - forward:        `pairwise_affinity` alone.
  - grad:           the gradient of sum(weights * affinities) in the embeddings with the
                    op's hand-written backward pass (what a train step runs).
  - grad, autodiff: the same gradient by jax.grad through the forward's own loop (the
                    op without its custom backward), for comparison.
The two gradient methods are timed in turn (a, b, a, b, ...), so a machine whose speed
drifts meets them alike. Compilation is excluded (one warm-up call each); medians.
max|diff| is between the two gradients.
"""

import argparse

import jax
import jax.numpy as jnp

from affinity_jax import io
from affinity_jax.benchmarks import timing
from affinity_jax.ops import affinity, neighbors


def _autodiff_affinity(features, offsets):
  """`pairwise_affinity` with jax.grad differentiating its forward loop."""
  # `fun` is the undecorated function of the custom_vjp: the same forward, plain autodiff.
  return affinity._pairwise(features, offsets, None, affinity._flat_affinity.fun)


def bench(grid: tuple[int, int], batch: int, dim: int, radius: int, repeats: int) -> dict:
  """One row: times in ms per call of the whole batch."""
  offsets = neighbors.half_disk_offsets(radius)
  features = jax.random.normal(jax.random.key(0), (batch, *grid, dim), jnp.float32)
  weights = jax.random.normal(jax.random.key(1), (batch, len(offsets), *grid), jnp.float32)
  forward = jax.jit(lambda f: affinity.pairwise_affinity(f, offsets))
  grads = {name: jax.jit(jax.grad(lambda f, fn=fn: jnp.sum(fn(f, offsets) * weights)))
           for name, fn in (("grad", affinity.pairwise_affinity),
                            ("grad_autodiff", _autodiff_affinity))}
  fwd_s, _ = timing.time_call(lambda: forward(features), repeats)
  results = {name: g(features) for name, g in grads.items()}   # Warm-up (compile).
  times = timing.time_calls_alternately(
      {name: (lambda g=g: g(features)) for name, g in grads.items()}, repeats)
  diff = float(jnp.max(jnp.abs(results["grad"] - results["grad_autodiff"])))
  return {"grid": f"{grid[0]}x{grid[1]}", "batch": batch, "dim": dim, "radius": radius,
          "offsets": len(offsets), "forward_ms": round(1e3 * fwd_s, 1),
          "grad_ms": round(1e3 * times["grad"][0], 1),
          "grad_autodiff_ms": round(1e3 * times["grad_autodiff"][0], 1),
          "speedup": round(times["grad_autodiff"][0] / times["grad"][0], 2),
          "max_abs_diff": diff}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grids", nargs="+", default=["24x24", "56x56"],
                      help="HxW feature grids: 24x24 is a 192 crop at stride 8, 56x56 448")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dim", type=int, default=448)
  parser.add_argument("--radii", default="5,12")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="affinity_loss.json")
  args = parser.parse_args(argv)
  grids = [tuple(int(n) for n in g.split("x")) for g in args.grids]
  rows = [bench(g, args.batch, args.dim, int(r), args.repeats)
          for g in grids for r in args.radii.split(",")]
  cols = ("grid", "batch", "dim", "radius", "offsets", "forward_ms", "grad_ms",
          "grad_autodiff_ms", "speedup", "max_abs_diff")
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(f"{r[c]:.1e}" if c == "max_abs_diff" else str(r[c])
                            for c in cols) + " |")
  io.write_json(args.out, {**timing.device_info(), "rows": rows})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
