"""The stages in order, and `run`: what `affinity_jax.main` calls."""

import dataclasses
import time
from typing import Callable

import jax
import ml_collections
from jax.experimental import multihost_utils

from affinity_jax import config_lib
from affinity_jax.stages import affinity
from affinity_jax.stages import cam
from affinity_jax.stages import common
from affinity_jax.stages import evaluate
from affinity_jax.stages import random_walk
from affinity_jax.stages import segmentation
from affinity_jax.training import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  done: Callable[[common.Context], bool]   # Outputs complete: `all` skips the stage.
  run: Callable[[common.Context], object]  # Resumes from whatever is already written.


STAGES = (
    Stage("train_cam", lambda ctx: ctx.trained("cam"), cam.train),
    Stage("infer_cam", lambda ctx: ctx.files.cams.finished(), cam.infer),
    Stage("aff_labels", lambda ctx: ctx.files.crf.finished(), affinity.make_labels),
    Stage("train_aff", lambda ctx: ctx.trained("aff"), affinity.train),
    Stage("infer_rw", lambda ctx: ctx.files.rw.finished(), random_walk.infer),
    Stage("train_seg", lambda ctx: not ctx.config.seg.enabled or ctx.trained("seg"),
          segmentation.train),
    Stage("eval", evaluate.done, evaluate.run),
)
MODES = ("all",) + tuple(s.name for s in STAGES)


def run(config: ml_collections.ConfigDict, config_name: str, workdir: str,
        mode: str = "all") -> common.Context:
  """Runs one stage (`mode`) or every unfinished stage in order (`all`)."""
  mesh_lib.maybe_initialize_distributed(config)
  config_lib.check_workdir(config, workdir, config_name)
  ctx = common.Context(config, workdir, mesh_lib.make_mesh())
  ctx.prepare_data()
  for stage in STAGES:
    if mode not in ("all", stage.name):
      continue
    if mode == "all" and stage.done(ctx):
      print(f"[{stage.name}] done already, skipped", flush=True)
      continue
    start = time.perf_counter()
    print(f"[{stage.name}] running", flush=True)
    stage.run(ctx)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(stage.name)
    print(f"[{stage.name}] finished in {time.perf_counter() - start:.1f} s", flush=True)
  return ctx
