"""Progress of long loops, wherever the output goes.

On a terminal or in a notebook the loop gets a live tqdm bar (tqdm.auto: a widget in
Jupyter and Colab). Anywhere else (stderr redirected to a file under nohup, a CI log,
`!python -m ...` in a Colab cell) a bar would either be switched off or fill the log
with carriage returns, so the loop prints one plain line every `every_s` seconds
instead, plus one when it starts and one when it ends:

  aff: 120/600 (20%), 1.62 step/s, loss=0.4123, lr=9.10e-03, img_s=12.9, elapsed 1:14, ETA 4:56

`Progress` takes tqdm's common arguments, so `tqdm(...)` becomes `Progress(...)`:

  with Progress(total=len(todo), desc="infer_cam", unit="img") as bar:
    for ...:
      bar.update(1)

  for image_id in Progress(ids, desc="CAM", unit="img"):
    ...

Lines are checked only when the loop calls `update` (there is no timer thread), so a
single step longer than `every_s` delays its line until it ends. The interval defaults
to 30 s; the environment variable AFFINITY_JAX_PROGRESS_S sets another.

This module imports only the standard library (tqdm when a bar is shown), so the CRF
worker processes, which import `labels.crf`, stay light.
"""

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

ENV_INTERVAL = "AFFINITY_JAX_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0

_clock = time.monotonic  # Tests replace it.


def _interval() -> float:
  value = os.environ.get(ENV_INTERVAL, "")
  try:
    return float(value) if value else DEFAULT_INTERVAL_S
  except ValueError:
    return DEFAULT_INTERVAL_S


def in_notebook() -> bool:
  """True inside a Jupyter / Colab kernel (not a plain IPython shell, not a subprocess)."""
  ipython = sys.modules.get("IPython")
  try:
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config
  except Exception:  # pylint: disable=broad-except
    return False


def _is_terminal(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


def format_seconds(seconds: float) -> str:
  """3725.2 -> '1:02:05', 74 -> '1:14'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
  """A progress display: a tqdm bar when someone watches, plain timed lines otherwise.

  Args:
    iterable: optional; iterating the `Progress` yields its items and counts them.
    total: the number of units (default: `len(iterable)` when it has one); None for
      an open-ended loop (no percentage, no ETA).
    desc: what the loop does, printed first.
    unit: what is counted (`img`, `step`, ...), shown in the rate.
    initial: units already done (a resumed run); the rate counts only new ones.
    disable: no output at all. tqdm's `disable=None` ("off when not a terminal")
      counts as False: here a non-terminal gets plain lines.
    every_s: seconds between plain lines (default: `AFFINITY_JAX_PROGRESS_S` or 30).
    file: where to write (default: sys.stderr); a bar is used when it is a terminal
      or when running in a notebook kernel.
    **bar_kwargs: passed to tqdm when a bar is shown (e.g. `dynamic_ncols`, `leave`).
  """

  def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
               desc: str = "", unit: str = "it", initial: int = 0,
               disable: bool | None = False, every_s: float | None = None,
               file: TextIO | None = None, **bar_kwargs: Any):
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
    self.n = self._start_n = self._line_n = initial
    self.postfix: dict[str, Any] = {}
    self.every_s = _interval() if every_s is None else float(every_s)
    self._file = sys.stderr if file is None else file
    self._start = self._line_t = _clock()
    self._bar = None
    self._closed = bool(disable)
    if self._closed:
      return
    notebook = in_notebook()
    if notebook or _is_terminal(self._file):
      if notebook:
        from tqdm.auto import tqdm
      else:
        from tqdm import tqdm
      self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self._file,
                       **bar_kwargs)
    elif total != 0:
      self._line()

  def update(self, n: int = 1) -> None:
    """Counts `n` more units done."""
    self.n += n
    if self._closed:
      return
    if self._bar is not None:
      self._bar.update(n)
    elif _clock() - self._line_t >= self.every_s:
      self._line()

  def set_postfix(self, **fields: Any) -> None:
    """Values shown after the rate (e.g. loss=..., lr=...) until set again."""
    self.postfix = dict(fields)
    if self._bar is not None:
      self._bar.set_postfix(self.postfix, refresh=False)

  def close(self) -> None:
    """Ends the display; a plain display prints a last line if anything moved."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.n != self._line_n:
      self._line()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self) -> Iterator:
    if self.iterable is None:
      raise TypeError("Progress was created without an iterable")
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def line(self) -> str:
    """The plain line for the current state."""
    elapsed = _clock() - self._start
    rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
    count = f"{self.n}"
    if self.total:
      count += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
    speed = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"  # No exponents.
    parts = [count, f"{speed} {self.unit}/s"]
    parts += [f"{k}={v}" for k, v in self.postfix.items()]
    parts.append(f"elapsed {format_seconds(elapsed)}")
    if self.total and rate > 0 and self.n < self.total:
      parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
    return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

  def _line(self) -> None:
    self._line_t, self._line_n = _clock(), self.n
    self._file.write(self.line() + "\n")
    self._file.flush()
