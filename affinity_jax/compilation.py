"""Counting the XLA programs a piece of work compiles, and the time compiling took.

Each new input shape of a jitted function is a new program: on a GPU or TPU the compile
of a large network costs tens of seconds, so a stage that meets many shapes spends its
time compiling. `Compiles` listens to jax's backend-compile events
(`jax.monitoring`) while it is active; the stages print it on their closing line and
the benchmarks report it.
"""

import collections
import threading

import jax

# jax._src.dispatch.BACKEND_COMPILE_EVENT: one event per program compiled (or loaded
# from the persistent compilation cache), with its duration and the function's name.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
  """Programs compiled while active: `with Compiles() as compiles: ...`.

  Attributes:
    count: programs compiled.
    seconds: time spent compiling them.
    by_name: programs compiled per jitted function name.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.by_name = collections.Counter()
    self._lock = threading.Lock()

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.count += 1
        self.seconds += duration
        self.by_name[kwargs.get("fun_name", "?")] += 1

  def __enter__(self) -> "Compiles":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def __str__(self) -> str:
    return f"compiled {self.count} program{'s' * (self.count != 1)} in {self.seconds:.1f} s"
