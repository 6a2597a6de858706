"""Training checkpoints with orbax: train state as arrays, pipeline position as JSON.

A checkpoint step folder holds two items:
  - `state`: a pytree of arrays (model parameters and other variables as pure dicts,
    optimiser state, step), written with `StandardSave`;
  - `data`: the input iterator's `get_state()` dict, written with `JsonSave`.
No rng key is saved: the training loop rebuilds its base key from the config's `seed`
(fixed within a workdir) and folds in the step, so a resumed run draws the same keys.
Orbax writes each step to a temporary folder and renames it when complete, so a killed
run leaves either the previous checkpoints or the new one, never a half-written one.
A save that fails for want of space or permission is a one-line `UserError`
(`io.write_error`); its temporary folder is not a checkpoint, and the next run resumes
from the last complete one.
"""

import base64
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from affinity_jax import io
from affinity_jax.errors import UserError
from affinity_jax.training.optim import path_str


MODEL_KEYS = ("params", "rest")
_BYTES_KEY = "__bytes_base64__"


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
  """Saves and restores the training state under `directory`.

  Args:
    directory: the checkpoint folder (one sub-folder per saved step).
    keep: how many most recent checkpoints to keep.
    save_every: `maybe_save` saves when `step % save_every == 0`.
  """

  def __init__(self, directory: str, keep: int = 2, save_every: int = 1000):
    self.directory = io.abspath(directory)
    self.save_every = max(int(save_every), 1)
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True)
    with io.writing(self.directory):
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | bytes | None = None,
           force: bool = True) -> bool:
    """Writes `state` (pytree of arrays) and `data_state` as `step`.

    `data_state` is a JSON-serialisable dict, or bytes (what some grain iterators
    return), kept base64-encoded.
    """
    if isinstance(data_state, bytes):
      data_state = {_BYTES_KEY: base64.b64encode(data_state).decode("ascii")}
    # Orbax raises a failed asynchronous write at the next save or wait: the folder,
    # not this step, is what could not be written.
    with io.writing(self.directory):
      saved = self._manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {})),
          force=force)
    return bool(saved)

  def maybe_save(self, step: int, state: Any, data_state: dict | bytes | None = None) -> bool:
    """Saves when `step` is a multiple of `save_every`."""
    if step % self.save_every:
      return False
    return self.save(step, state, data_state)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | bytes]:
    """Reads a checkpoint into the structure, shapes and shardings of `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with `sharding`) or arrays.
      step: which checkpoint; default the latest.

    Returns:
      (state, data_state): data_state as given to `save`.

    Raises:
      UserError: no checkpoint, or one written for another model (the message names
        the first parameter whose presence or shape differs).
    """
    step = self._readable_step(step, abstract_state)
    abstract = jax.tree.map(_abstract, abstract_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore()))
    data_state = dict(restored["data"] or {})
    if set(data_state) == {_BYTES_KEY}:
      data_state = base64.b64decode(data_state[_BYTES_KEY])
    return restored["state"], data_state

  def restore_model(self, abstract_model: dict, step: int | None = None) -> Any:
    """Reads only the model's variables of a checkpoint (for inference).

    The optimiser state, step and pipeline position stay on disk: nothing is built or
    read for them.

    Args:
      abstract_model: `{"params": ..., "rest": ...}` pytrees of arrays or
        `jax.ShapeDtypeStruct`s (with `sharding`), as `train` saved them.
      step: which checkpoint; default the latest.

    Returns:
      The restored `{"params": ..., "rest": ...}`.

    Raises:
      UserError: as `restore`.
    """
    step = self._readable_step(step, abstract_model)
    abstract = jax.tree.map(_abstract, abstract_model)
    # The `state` item alone, and of it only these keys (orbax partial restore).
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(
          os.path.join(self.directory, str(step), "state"),
          args=ocp.args.PyTreeRestore(
              item=abstract, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))

  def _readable_step(self, step: int | None, abstract_state: Any) -> int:
    """`step` (default the latest) once written, after checking it fits the state."""
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"checkpoint directory {self.directory} holds no checkpoint")
    self._check_compatible(step, abstract_state)
    return step

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:  # A corrupt or foreign folder: say which one.
      raise UserError(
          f"checkpoint {self.directory}/{step} cannot be read ({type(e).__name__}); "
          "delete it or use another --workdir") from None
    saved = getattr(metadata, "tree", metadata)
    wanted = abstract_state
    # The model's variables name the mismatch best; optimiser state follows from them.
    model_keys = [k for k in MODEL_KEYS if isinstance(wanted, dict) and k in wanted]
    if model_keys and isinstance(saved, dict):
      saved = {k: saved.get(k, {}) for k in model_keys}
      wanted = {k: wanted[k] for k in model_keys}
    saved, wanted = _shapes(saved), _shapes(wanted)
    for name, shape in wanted.items():
      if name not in saved:
        raise UserError(
            f"checkpoint {self.directory} was written by another model: it has no "
            f"parameter {name} (model shape {shape}); use another --workdir")
      if saved[name] != shape:
        raise UserError(
            f"checkpoint {self.directory} was written by another model: {name} has shape "
            f"{saved[name]} there but {shape} in this model; use another --workdir")
    for name, shape in saved.items():
      if name not in wanted:
        raise UserError(
            f"checkpoint {self.directory} was written by another model: its parameter "
            f"{name} {shape} is not in this model; use another --workdir")

  def wait(self) -> None:
    """Blocks until asynchronous writes are on disk."""
    with io.writing(self.directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with io.writing(self.directory):  # Closing waits for the writes too.
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    """Waits for asynchronous writes, then closes."""
    try:
      self.wait()
    finally:
      self.close()

def restore_model(model: nnx.Module, directory: str, step: int | None = None,
                  sharding: jax.sharding.Sharding | None = None) -> None:
  """Loads a training checkpoint's model variables into `model`, for inference.

  Only `params` and `rest` are read (`Checkpointer.restore_model`): no optimiser is
  built and its state is not read.

  Args:
    model: the network as built (its variables give the shapes), updated in place.
    directory: the checkpoint folder `loop.train` wrote.
    step: which checkpoint; default the latest.
    sharding: where the restored arrays go (default: where the model's arrays are).
  """
  # The same split as `loop.train`: rng state is not saved.
  _, params, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding),
      dict(params=nnx.to_pure_dict(params), rest=nnx.to_pure_dict(rest)))
  ckpt = Checkpointer(directory)
  try:
    state = ckpt.restore_model(abstract, step)
  finally:
    ckpt.close()
  nnx.update(model, nnx.State(state["params"]), nnx.State(state["rest"]))
