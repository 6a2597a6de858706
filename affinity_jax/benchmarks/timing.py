"""Timing helpers shared by the benchmark scripts."""

import platform
import statistics
import time
from typing import Any, Callable

import jax


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


def device_info() -> dict:
  """Where the numbers were taken: JAX device kind and count, host CPU, JAX version."""
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}",
          "devices": jax.device_count(), "host": platform.processor() or platform.machine(),
          "jax": jax.__version__}
