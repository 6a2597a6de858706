"""Timing helpers shared by the benchmark scripts."""

import platform
import resource
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import nnx

from affinity_jax import sharding
from affinity_jax.training import loop


def time_call(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, Any]:
  """Median wall time of `fn()` over `repeats` calls, each waited for with
  `block_until_ready`.

  Args:
    fn: the call to time; it may close over state it updates (e.g. a train state).
    repeats: timed calls (>= 1).
    warmup: make one untimed call first (compiles a jitted function).

  Returns:
    (median seconds per call, the last call's output).
  """
  if warmup:
    jax.block_until_ready(fn())
  times, out = [], None
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def first_call(fn: Callable[[], Any]) -> float:
  """Wall seconds of one call of `fn()`, waited for with `block_until_ready`: a jitted
  function's first call, so its compilation included."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def train_steps(model: nnx.Module, make_tx: Callable[[dict], optax.GradientTransformation],
                schedule: optax.Schedule, loss_fn: loop.LossFn, mesh: jax.sharding.Mesh,
                frozen_prefixes: Sequence[str] = ()) -> Callable[[Mapping], jax.Array]:
  """The training loop's own step on `model`, as `loop.train` sets it up.

  Args:
    model: the network; its variables are copied into a fresh train state
      (`loop.create_train_state`), so it stays usable.
    make_tx: the optimiser of the model's parameters (pure dict).
    schedule: the learning rate the step reports.
    loss_fn: as `loop.train`'s.
    mesh: the state is replicated on it, batches are split over it.
    frozen_prefixes: parameter paths that receive no updates.

  Returns:
    `step(batch) -> loss`: one jitted step (`loop.make_train_step`, donated state) on a
    batch of global arrays split on the mesh; each call keeps the new state for the next.
  """
  graphdef, params, rng_state, rest = loop.split_model(model)
  tx = make_tx(params)
  holder = {"state": loop.create_train_state(tx, params, rest, mesh)}
  step_fn = loop.make_train_step(graphdef, tx, loss_fn, schedule, rng_state, mesh,
                                 frozen_prefixes)
  rng = jax.device_put(jax.random.key(0), sharding.replicated(mesh))

  def step(batch):
    holder["state"], metrics = step_fn(holder["state"], batch, rng)
    return metrics["loss"]

  return step


def time_calls_alternately(fns: dict[str, Callable[[], Any]],
                           repeats: int) -> dict[str, tuple[float, float]]:
  """Median wall and process CPU seconds of each `fns[name]()`, the calls taken in
  turn (a, b, a, b, ...) so that a load that comes and goes meets them alike.

  CPU time is this process's user + system time (all its threads): on a CPU shared
  with other jobs it moves less than wall time. Each call is waited for with
  `block_until_ready`; make the warm-up calls before.

  Returns:
    {name: (median wall seconds, median CPU seconds)}.
  """
  times = {name: ([], []) for name in fns}
  for _ in range(max(1, repeats)):
    for name, fn in fns.items():
      c0, t0 = cpu_seconds(), time.perf_counter()
      jax.block_until_ready(fn())
      times[name][0].append(time.perf_counter() - t0)
      times[name][1].append(cpu_seconds() - c0)
  return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def cpu_name() -> str:
  """The host CPU's model name from /proc/cpuinfo (else `platform.processor()`)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict:
  """Where the numbers were taken: JAX device kind and count, host CPU, JAX version."""
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}",
          "devices": jax.device_count(), "host": cpu_name(),
          "jax": jax.__version__}
