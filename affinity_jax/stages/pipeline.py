"""The stages in order, and `run`: what `affinity_jax.main` calls."""

import dataclasses
import time
from typing import Callable

import jax
import ml_collections

from affinity_jax import compilation
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
  # Several hosts share the workdir: process 0 writes what is not per-image.
  first = jax.process_index() == 0
  config_lib.check_workdir(config, workdir, config_name, write=first)
  ctx = common.Context(config, workdir, mesh_lib.make_mesh())
  if first:
    ctx.prepare_data()
  mesh_lib.sync("prepare_data")
  for stage in STAGES:
    if mode not in ("all", stage.name):
      continue
    # Every host runs or skips a stage together (training steps are collective).
    if mode == "all" and mesh_lib.all_processes(stage.done(ctx)):
      print(f"[{stage.name}] done already, skipped", flush=True)
      continue
    start = time.perf_counter()
    print(f"[{stage.name}] running", flush=True)
    with compilation.Compiles() as compiles:
      stage.run(ctx)
    mesh_lib.sync(stage.name)
    print(f"[{stage.name}] finished in {time.perf_counter() - start:.1f} s; {compiles}",
          flush=True)
  return ctx
