"""Sends this process SIGTERM at a chosen point of a run, as a preemption would.

Put this folder first on PYTHONPATH with AFFINITY_JAX_STOP_AT set to
  train:<network kind>:<step>   process 0 only, while it fetches the batch after <step>
                                of the training stage of that network (so in step + 1);
  infer_cam:<count>             every process, right after it stores its <count>-th CAM.
tests/test_multihost.py runs `affinity_jax.launch` with it: deterministic points where
a timer could not be.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

_SPEC = os.environ.get("AFFINITY_JAX_STOP_AT", "")
_FLAG = "--config.distributed.process_id="
_PROCESS = next((a[len(_FLAG):] for a in sys.orig_argv if a.startswith(_FLAG)), "0")


def _stop():
  os.kill(os.getpid(), signal.SIGTERM)


def _patch_loop(module):
  _, kind, step = _SPEC.split(":")
  real = module._next_batch

  def next_batch(batches, at, steps, folder):
    if _PROCESS == "0" and at == int(step) and os.path.basename(folder) == kind:
      _stop()
    return real(batches, at, steps, folder)
  module._next_batch = next_batch


def _patch_workdir(module):
  count = int(_SPEC.split(":")[1])
  real, saved = module.CamStore.save, []

  def save(self, *args):
    real(self, *args)
    saved.append(args[0])
    if len(saved) == count:
      _stop()
  module.CamStore.save = save


class _Patcher(importlib.abc.MetaPathFinder):
  """Patches the module named `target` right after it is first executed."""

  def __init__(self, target, patch):
    self.target, self.patch = target, patch

  def find_spec(self, name, path, target=None):
    if name != self.target:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      self.patch(module)
    spec.loader.exec_module = exec_module
    return spec


if _SPEC.startswith("train:"):
  sys.meta_path.insert(0, _Patcher("affinity_jax.training.loop", _patch_loop))
elif _SPEC.startswith("infer_cam:"):
  sys.meta_path.insert(0, _Patcher("affinity_jax.workdir", _patch_workdir))
