"""Forward and train-step throughput (images/s) per backbone, with the CAM head.

  python -m affinity_jax.benchmarks.models --backbones=tiny,lite0 --size=448 --batch=2

Forward: `CAMNet(x, train=False)` jitted. Train step: the training loop's own step
(`training.loop.make_train_step`) on one device with a multi-label soft-margin loss
and plain SGD: gradients of every nnx.Param except the backbone's frozen layers,
the state donated, dropout keys from `fold_in(key, step)`. Forward and step calls are
timed in turn (medians); `step_in_forwards` is a step's time in forwards of the same
batch. Times exclude compilation (reported separately). Prints a table and writes JSON.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from affinity_jax import io as aio
from affinity_jax import sharding
from affinity_jax.benchmarks import timing
from affinity_jax.models import CAMNet

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

  mesh = sharding.make_mesh(jax.devices()[:1])

  def loss_fn(model, batch, key, train):
    logits, _ = model(batch["image"], train=train, key=key)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["labels"])), {}

  # The train state is a copy: the step donates it, and the forward keeps using `params`.
  step = timing.train_steps(model, lambda _: optax.sgd(1e-3), optax.constant_schedule(1e-3),
                            loss_fn, mesh, model.backbone.frozen_prefixes)
  data = sharding.shard_batch({"image": x, "labels": labels}, mesh)
  one = lambda: step(data)

  fwd_compile = timing.first_call(lambda: forward(params, rest, x))
  train_compile = timing.first_call(one)
  # Taken in turn, so that a machine whose speed drifts (a shared VM) slows both alike
  # and their ratio holds.
  times = timing.time_calls_alternately({"forward": lambda: forward(params, rest, x),
                                         "train": one}, iters)
  fwd, step = times["forward"][0], times["train"][0]
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {"backbone": name, "size": size, "batch": batch, "params_M": round(n_params / 1e6, 2),
          "forward_img_s": round(batch / fwd, 3), "train_img_s": round(batch / step, 3),
          "step_in_forwards": round(step / fwd, 2),
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
          "step_in_forwards", "forward_compile_s", "train_compile_s")
  print(" | ".join(cols))
  for r in rows:
    print(" | ".join(str(r[c]) for c in cols))
  aio.write_json(args.out, {**timing.device_info(), "rows": rows})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  main()
