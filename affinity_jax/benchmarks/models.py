"""Forward and train-step throughput (images/s) per backbone, with the CAM head.

  python -m affinity_jax.benchmarks.models --backbones=tiny,lite0 --size=448 --batch=2

Forward: `CAMNet(x, train=False)` jitted. Train step: multi-label soft-margin
loss, gradients of every nnx.Param except the backbone's frozen layers (which get
none in training either), plain SGD update, jitted with the parameters donated;
dropout keys from `fold_in(key, step)`. Times exclude compilation (reported
separately). Prints a table and writes JSON.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from affinity_jax import io as aio
from affinity_jax.benchmarks import timing
from affinity_jax.models import CAMNet
from affinity_jax.training import optim

DEFAULT_BACKBONES = ("tiny", "lite0", "vgg16", "resnet38")


def bench(name: str, size: int, batch: int, iters: int) -> dict:
  """Measures one backbone; returns a row of the table."""
  model = CAMNet(name, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
  labels = (jax.random.uniform(jax.random.key(2), (batch, 20)) < 0.2).astype(jnp.float32)

  @jax.jit
  def forward(params, rest, x):
    logits, aux = nnx.merge(graphdef, params, rest)(x, train=False)
    return logits, aux["cams"]

  frozen = model.backbone.frozen_prefixes

  @jax.jit
  def train_step(params, rest, x, y, key):
    def loss_fn(p):
      p = optim.stop_frozen_gradients(p, frozen)
      logits, _ = nnx.merge(graphdef, p, rest)(x, train=True, key=key)
      return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), loss

  t0 = time.perf_counter()
  jax.block_until_ready(forward(params, rest, x))
  fwd_compile = time.perf_counter() - t0
  fwd, _ = timing.time_call(lambda: forward(params, rest, x), iters, warmup=False)

  t0 = time.perf_counter()
  state = {"params": jax.block_until_ready(train_step(params, rest, x, labels, jax.random.key(0))[0])}
  train_compile = time.perf_counter() - t0

  state["step"] = 0

  def one():
    state["step"] += 1
    state["params"], loss = train_step(state["params"], rest, x, labels,
                                       jax.random.fold_in(jax.random.key(0), state["step"]))
    return loss

  step, _ = timing.time_call(one, iters, warmup=False)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {"backbone": name, "size": size, "batch": batch, "params_M": round(n_params / 1e6, 2),
          "forward_img_s": round(batch / fwd, 3), "train_img_s": round(batch / step, 3),
          "forward_compile_s": round(fwd_compile, 1), "train_compile_s": round(train_compile, 1)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--out", default="benchmark_models.json")
  args = parser.parse_args(argv)
  rows = [bench(n, args.size, args.batch, args.iters) for n in args.backbones.split(",")]
  cols = ("backbone", "size", "batch", "params_M", "forward_img_s", "train_img_s",
          "forward_compile_s", "train_compile_s")
  print(" | ".join(cols))
  for r in rows:
    print(" | ".join(str(r[c]) for c in cols))
  aio.write_json(args.out, {**timing.device_info(), "rows": rows})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
