"""The stages in order, and `run`: what `affinity_jax.main` calls."""

import contextlib
import dataclasses
import tempfile
import time
from typing import Callable

import jax
import ml_collections

from affinity_jax import compilation
from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import stopping
from affinity_jax import workdir as workdir_layout
from affinity_jax.errors import UserError
from affinity_jax.stages import affinity
from affinity_jax.stages import cam
from affinity_jax.stages import common
from affinity_jax.stages import evaluate
from affinity_jax.stages import random_walk
from affinity_jax.stages import segmentation


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  done: Callable[[common.Context], bool]   # Outputs complete: `all` skips the stage.
  run: Callable[[common.Context], object]  # Resumes from whatever is already written.


STAGES = (
    Stage("train_cam", lambda ctx: ctx.trained("cam"), cam.train),
    Stage("infer_cam", lambda ctx: ctx.files.cams.finished(), cam.infer),
    # The CRF labels only train AffinityNet: not needed when its weights are given.
    Stage("aff_labels", lambda ctx: ctx.files.crf.finished() or bool(ctx.config.aff.weights),
          affinity.make_labels),
    Stage("train_aff", lambda ctx: ctx.trained("aff"), affinity.train),
    Stage("infer_rw", lambda ctx: ctx.files.rw.finished(), random_walk.infer),
    Stage("train_seg", lambda ctx: not ctx.config.seg.enabled or ctx.trained("seg"),
          segmentation.train),
    Stage("eval", evaluate.done, evaluate.run),
)
MODES = ("all",) + tuple(s.name for s in STAGES)


def run(config: ml_collections.ConfigDict, config_name: str, workdir: str,
        mode: str = "all") -> common.Context:
  """Runs one stage (`mode`) or every unfinished stage in order (`all`).

  Holds the workdir's lock throughout (`workdir.lock`; a second run on it is refused
  with `workdir.InUse`). `--mode=eval` on a workdir another run holds evaluates what
  is there without writing to it (`read_only_eval`). SIGTERM or SIGINT stops the run at
  the next step or image with its work kept (`affinity_jax.stopping`).
  """
  sharding.maybe_initialize_distributed(config)
  # Several hosts share the workdir: process 0 writes what is not per-image.
  first = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    busy = _lock(workdir, stack)
    if busy is not None and mode == "eval":
      workdir_layout.claim(config, workdir, config_name, write=False)
      return read_only_eval(common.Context(config, workdir, sharding.make_mesh()), busy)
    if busy is not None:
      raise busy
    stack.enter_context(stopping.handling_signals())
    if jax.process_count() > 1:  # Every host stops at its next image or step.
      stack.enter_context(stopping.share_with_peers(sharding.publish_stop,
                                                    sharding.published_stop))
    workdir_layout.claim(config, workdir, config_name, write=first)
    ctx = common.Context(config, workdir, sharding.make_mesh())
    if first or ctx.datasets_per_host:
      with io.writing(ctx.data_dir):
        ctx.prepare_data()
    sharding.sync("prepare_data")
    for stage in STAGES:
      if mode not in ("all", stage.name):
        continue
      _stop_if_requested(f"before {stage.name}")
      # Every host runs or skips a stage together (training steps are collective).
      if mode == "all" and sharding.all_processes(stage.done(ctx)):
        print(f"[{stage.name}] done already, skipped", flush=True)
        continue
      start = time.perf_counter()
      print(f"[{stage.name}] running", flush=True)
      try:
        with compilation.Compiles() as compiles:
          stage.run(ctx)
      except stopping.Stopped:
        print(f"[{stage.name}] stopped after {time.perf_counter() - start:.1f} s", flush=True)
        raise
      # A host done with its images stops with the others rather than wait for them here.
      stopping.stop_if_requested(f"after {stage.name}, its outputs stored")
      sharding.sync(stage.name)
      print(f"[{stage.name}] finished in {time.perf_counter() - start:.1f} s; {compiles}",
            flush=True)
  return ctx


def _lock(workdir: str, stack: contextlib.ExitStack) -> workdir_layout.InUse | None:
  """Takes the workdir's lock (process 0, for every host) before anything is written.

  Returns:
    None when this run holds it; the `InUse` naming the holder when another run does.

  Raises:
    UserError: the lock cannot be taken for another reason (process 0 names it).
  """
  outcome, error = None, None
  if jax.process_index() == 0:
    try:
      stack.enter_context(workdir_layout.lock(workdir))
      outcome = "held"
    except workdir_layout.InUse as e:
      outcome, error = "busy", e
    except UserError as e:
      outcome, error = "failed", e
  # The other hosts learn process 0's outcome (and the holder), so all go on or stop.
  outcome, holder = sharding.gather_json(
      [outcome, error.holder if isinstance(error, workdir_layout.InUse) else None])[0]
  if outcome == "busy":
    return error or workdir_layout.InUse(workdir, holder or {})
  if outcome == "failed":
    raise error or UserError(f"workdir {workdir}: process 0 could not take its lock (see "
                             "its output)")
  return None


def read_only_eval(ctx: common.Context, busy: workdir_layout.InUse) -> common.Context:
  """The eval stage on a workdir another run writes: its reports go to a new temporary
  folder (named on stdout), nothing is written in the workdir."""
  out = tempfile.mkdtemp(prefix="affinity_eval_")
  print(f"note: {busy.where}: reading it only, the reports go to {out}", flush=True)
  ctx.files.reports = workdir_layout.ReportStore(out, folder="")
  evaluate.run(ctx)
  return ctx


def _stop_if_requested(what: str) -> None:
  """Between stages: stops every process when a signal reached any of them."""
  signum = max(sharding.gather_json(stopping.requested()))
  if signum:
    raise stopping.stopped(what, signum)
