"""Stopping a run cleanly on SIGTERM or SIGINT, at a point where nothing is lost.

Spot and preemptible VMs, Kubernetes and SLURM end a job with SIGTERM and kill it tens
of seconds later; Ctrl-C sends SIGINT. While `handling_signals` is active (the stage
runner holds it around the stages), either signal only records a stop request: a
training loop saves a checkpoint at its next step boundary, an inference loop
finishes the image at hand, and both then raise `Stopped`, which `affinity_jax.main`
prints as one line before exiting with 128 + the signal's number (143 for SIGTERM,
130 for SIGINT). A second signal stops at once (`KeyboardInterrupt`).

Standard library only: every layer may ask `requested()`.
"""

import contextlib
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int = 0  # The first stop signal's number since `handling_signals` began; 0: none.


class Stopped(Exception):
  """The run stopped on a signal after keeping its work; `code` is the exit status."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.code = 128 + signum


def name(signum: int) -> str:
  """"SIGTERM", "SIGINT", ... for a signal number."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


_peers = None  # `share_with_peers`'s functions, on several hosts.


def requested() -> int:
  """The number of the signal that asked this process, or another of the run (see
  `share_with_peers`), to stop; 0 when none did."""
  if _peers is None:
    return _requested
  publish, look = _peers
  if _requested:
    publish(_requested)
    return _requested
  return look()


@contextlib.contextmanager
def share_with_peers(publish, look) -> Iterator[None]:
  """Inside the block, `requested` tells the run's other processes of this one's signal
  (`publish(signum)`) and learns of theirs (`look() -> signum or 0`), so that every host
  of a multi-host run stops at its next image too."""
  global _peers
  _peers = (publish, look)
  try:
    yield
  finally:
    _peers = None


def request(signum: int) -> None:
  """Asks this process to stop as `signum` would (what the signal handler does)."""
  global _requested
  if not _requested:
    _requested = signum


def stopped(what: str, signum: int = 0) -> Stopped:
  """The `Stopped` of `signum` (default the requested one): "stopped by SIGTERM <what>".

  Args:
    what: where the run stopped and what it kept, e.g. "in infer_cam after 3 of 16
      images (each one stored)".
    signum: the signal (another process's, on several hosts).
  """
  signum = signum or requested() or signal.SIGTERM
  return Stopped(f"stopped by {name(signum)} {what}; run the same command again to "
                 "resume", signum)


def stop_if_requested(what: str) -> None:
  """Raises `stopped(what)` when a stop was requested."""
  signum = requested()
  if signum:
    raise stopped(what, signum)


def _handler(signum, frame) -> None:
  del frame
  if _requested:  # The second signal: stop now.
    raise KeyboardInterrupt
  request(signum)
  print(f"{name(signum)} received: stopping at the next step or image, keeping the work "
        "done (send it again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
  """SIGTERM and SIGINT request a stop (`requested`) inside this block.

  Only the main thread can install signal handlers; elsewhere (e.g. a notebook's worker
  thread) the block changes nothing. The previous handlers come back on exit.
  """
  global _requested
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _requested = 0
  previous = {s: signal.signal(s, _handler) for s in SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      # None: a handler not installed from Python (e.g. by a C library); the default.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    _requested = 0
