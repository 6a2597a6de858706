"""A generic training loop for the three trained networks (classifier, AffinityNet, segmentation).

The model is split once into a graph definition and pure dicts of arrays:
`params` (`nnx.Param`), `rngs` (`nnx.RngState`, passed through, never saved) and
`rest` (every other variable, e.g. frozen BatchNorm statistics). Two jitted pure
functions perform a step (one, in a run over several processes): the forward merges the
model from the dicts, calls `loss_fn` and keeps what the gradient needs; the backward
takes the gradient with respect to `params` and applies the optimiser. Parameters and
optimiser state are replicated over the mesh, the batch is split on its `data` axis, and
the train state is donated so its buffers are reused in place.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from affinity_jax import io
from affinity_jax import sharding
from affinity_jax import stopping
from affinity_jax.errors import UserError
from affinity_jax.progress import Progress
from affinity_jax.training import optim
from affinity_jax.training.checkpoint import Checkpointer

# loss_fn(model, batch, rng, train=True) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


class BatchIterator(Protocol):
  """What `train` needs from the input pipeline."""

  def __next__(self) -> Mapping[str, jax.Array]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


def _pure(state: nnx.State) -> dict:
  return nnx.to_pure_dict(state)


def _batch_size(batch: Mapping[str, Any]) -> int:
  leaves = jax.tree.leaves(batch)
  return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 0


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: LossFn, schedule: optax.Schedule, rng_state: Any,
                    mesh: jax.sharding.Mesh, frozen_prefixes: Sequence[str] = ()) -> Callable:
  """The train step `(state, batch, rng) -> (state, metrics)`, made of jitted pure functions.

  Parameters under `frozen_prefixes` enter the loss behind `stop_gradient`
  (`optim.stop_frozen_gradients`). `state` is `{"params", "rest", "opt_state", "step"}`
  (replicated, donated); `batch` is split on `data`; `rng` is the replicated base key,
  folded with the step number. `metrics` holds `loss`, `lr` and every entry of the loss
  function's metrics dict.

  In a single process the forward pass (`jax.vjp`) and the backward pass with the
  update are compiled separately, and the forward's residuals are passed between them.
  In one executable XLA recomputes cheap-looking forward fusions inside the backward
  fusions that read them (on the CPU each depthwise convolution's k*k taps, twice per
  Lite0 block): the Lite0 step at 192 px took ~20% longer (docs/models.md). A run over
  several processes keeps one executable (see below).
  """
  replicated = sharding.replicated(mesh)

  def forward(state, batch, rng):
    key = jax.random.fold_in(rng, state["step"])

    def loss_of(params):
      params = optim.stop_frozen_gradients(params, frozen_prefixes)
      model = nnx.merge(graphdef, nnx.State(params), nnx.State(rng_state),
                        nnx.State(state["rest"]))
      loss, metrics = loss_fn(model, batch, key, train=True)
      _, _, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
      return loss, (metrics, _pure(rest))

    loss, vjp_fn, (metrics, rest) = jax.vjp(loss_of, state["params"], has_aux=True)
    return loss, metrics, rest, vjp_fn

  def backward(state, loss, metrics, rest, vjp_fn):
    (grads,) = vjp_fn(jnp.ones_like(loss))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = dict(metrics, loss=loss, lr=schedule(state["step"]))
    new_state = dict(params=params, rest=rest, opt_state=opt_state, step=state["step"] + 1)
    return new_state, out

  def chain(forward, backward):
    return lambda state, batch, rng: backward(state, *forward(state, batch, rng))

  in_shardings = (replicated, sharding.data_sharding(mesh), replicated)
  if jax.process_count() > 1:
    # Across processes: one executable. Split, a process whose peer had died hung in
    # its next forward call (in runs that went on, some steps' forward took 2 s instead
    # of 0.03 s, as if compiled again) until the coordination service aborted it,
    # instead of failing in a collective with a one-line error (tests/test_multihost.py).
    return jax.jit(chain(forward, backward), in_shardings=in_shardings,
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  return chain(jax.jit(forward, in_shardings=in_shardings),
               jax.jit(backward, out_shardings=(replicated, replicated), donate_argnums=(0,)))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict, dict]:
  """`model` as the train step takes it: (graphdef, params, rng_state, rest).

  `params` are its `nnx.Param`s, `rng_state` its `nnx.RngState` (passed through, never
  saved) and `rest` every other variable, each a pure dict of arrays.
  """
  graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, _pure(params), _pure(rng_state), _pure(rest)


def create_train_state(tx: optax.GradientTransformation, params: dict, rest: dict,
                       mesh: jax.sharding.Mesh, abstract: bool = False) -> dict:
  """The train state at step 0, replicated on `mesh`: what `make_train_step` takes.

  Args:
    tx: the optimiser; its state is `tx.init(params)`.
    params, rest: pure dicts of the model's variables (`split_model`).
    mesh: the mesh the state is replicated on.
    abstract: return only the state's shapes, dtypes and shardings (what a checkpoint
      is restored into), computing nothing.

  Returns:
    `{"params", "rest", "opt_state", "step"}`, the arrays new buffers (the model's own
    are never donated): made from host copies, so also valid on several hosts as long
    as each holds the same values.
  """
  replicated = sharding.replicated(mesh)

  def init_state(params, rest):
    return dict(params=params, rest=rest, opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32))

  if abstract:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init_state, params, rest))
  host = jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated), (params, rest))
  return jax.jit(init_state, out_shardings=replicated)(*host)


@dataclasses.dataclass(frozen=True)
class Output:
  """Where `train` writes.

  Attributes:
    checkpoints: the checkpoint folder (local or a bucket URL).
    metrics: the metrics log, one JSON object per line.
    name: the progress display's label.
  """
  checkpoints: str
  metrics: str
  name: str = "train"


def _restore_or_init(ckpt: Checkpointer, tx: optax.GradientTransformation, params: dict,
                     rest: dict, batches: BatchIterator, mesh: jax.sharding.Mesh
                     ) -> tuple[dict, int]:
  """The train state to start from and its step.

  The newest checkpoint, with `batches` moved to the position saved with it; or, when
  there is none, a fresh state at step 0 made from `params` and `rest`.
  """
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(
        create_train_state(tx, params, rest, mesh, abstract=True), start)
    batches.set_state(_own_data_state(data_state, ckpt.directory))
    return state, start
  return create_train_state(tx, params, rest, mesh), 0


PER_PROCESS = "per_process"  # Key of the input positions of a multi-host checkpoint.


def _data_state(batches: BatchIterator) -> Any:
  """The input's position to save with a checkpoint.

  On several hosts each reads its own share of the stream: the checkpoint (written
  once, by orbax's primary host) keeps every host's position, in process order.
  """
  state = batches.get_state()
  if jax.process_count() == 1:
    return state
  return {PER_PROCESS: sharding.gather_json(state)}


def _own_data_state(saved: Any, directory: str) -> Any:
  """This host's position out of what `_data_state` saved."""
  states = saved[PER_PROCESS] if isinstance(saved, dict) and PER_PROCESS in saved \
      else [saved]
  if len(states) != jax.process_count():
    raise UserError(
        f"checkpoint {directory} was saved by {len(states)} process(es) and resumes only "
        f"with as many (this run has {jax.process_count()}); use that many or another "
        "--workdir")
  return states[jax.process_index()]


def _next_batch(batches: BatchIterator, step: int, steps: int, name: str
                ) -> Mapping[str, jax.Array]:
  try:
    return next(batches)
  except StopIteration:
    raise UserError(f"the input pipeline of {name} ended at step {step} of {steps}") from None


class _MetricsLog:
  """`metrics.jsonl` and the progress display of one run, kept one step behind the device.

  `add(step, ...)` queues the metrics of `step` and writes those of the step before:
  reading them back waits for that step to finish, which by then overlaps the step just
  dispatched. `flush` writes the queued step too. Only process 0 writes; on resume,
  lines after the restored step are dropped so the log has no duplicates.
  """

  def __init__(self, out: Output, start: int, config: Any):
    self.name, self.steps = out.name, int(config.steps)
    self.logged = start  # The last step written.
    self._every = max(int(config.log_every), 1)
    self._pending = None  # (step, metrics, batch size) not written yet.
    self._last_t = time.perf_counter()
    main = jax.process_index() == 0
    path = out.metrics
    if main:
      _truncate_log(path, start)
    self._file = io.Appender(path if main else os.devnull)
    self._progress = Progress(
        total=self.steps, initial=start, unit="step", dynamic_ncols=True,
        desc=out.name,
        disable=not (bool(config.get("progress", True)) and main))

  def add(self, step: int, metrics: Mapping[str, jax.Array], batch_size: int) -> None:
    previous, self._pending = self._pending, (step, metrics, batch_size)
    if previous is not None:
      self._write(*previous)

  def flush(self) -> None:
    """Writes the queued step, and makes the whole log visible (in a bucket too)."""
    if self._pending is not None:
      self._write(*self._pending)
      self._pending = None
    self._file.sync()

  def catch_up(self, step: int) -> bool:
    """Writes the queued step if it directly follows the last one written.

    Returns:
      Whether the log now ends exactly at `step` (so a checkpoint there matches it).
    """
    if self._pending is not None and self.logged == step - 1:
      self.flush()
    return self.logged == step

  def close(self) -> None:
    self._file.close()
    self._progress.close()

  def __enter__(self) -> "_MetricsLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _write(self, step: int, metrics: Mapping[str, jax.Array], batch_size: int) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    values["images_per_s"] = batch_size / max(now - self._last_t, 1e-9)
    self._last_t = now
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(f"loss is {values['loss']} at step {step} in {self.name}")
    self._file.write(json.dumps({"step": step, **values}) + "\n")  # A cut line is
    # skipped, and dropped on resume.
    self.logged = step
    if step % self._every == 0 or step == self.steps:
      self._progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 img_s=f"{values['images_per_s']:.1f}")
    self._progress.update(1)


def _truncate_log(path: str, step: int) -> None:
  """Drops the lines of `path` after `step` (and lines cut by a kill)."""
  if io.exists(path):
    rows = [r for r in io.read_jsonl(path) if r.get("step", step + 1) <= step]
    io.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class _StopVote:
  """When to stop on a signal (`affinity_jax.stopping`): every process at the same step.

  On one process, at the first step boundary after the signal. On several, a save is
  collective, so each step boundary dispatches an OR over processes of their signals
  (a tiny collective, not waited for) and acts on the previous boundary's result, which
  every process reads at the same step: one step after the signal, the device queue
  never drained for it.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self._mesh = mesh
    self._pending = None  # The OR dispatched at the previous step boundary.

  def stop(self) -> int:
    """The stop signal's number (0: go on); every process must call it at every step."""
    if jax.process_count() == 1:
      return stopping.requested()
    previous = self._pending
    self._pending = sharding.max_over_processes(stopping.requested(), self._mesh)
    return 0 if previous is None else int(np.asarray(previous.addressable_data(0)))


def _save_on_interrupt(ckpt: Checkpointer, step: int, state: dict, batches: BatchIterator,
                       log: _MetricsLog) -> None:
  """Ctrl-C: keeps the work since the last checkpoint when that is safe.

  Only on a single host (on several, a save is collective and the other hosts were not
  interrupted) and only when the state, the iterator and the log agree on `step`.
  """
  if jax.process_count() == 1 and log.catch_up(step):
    ckpt.save(step, state, batches.get_state())


def train(model: nnx.Module, loss_fn: LossFn, batches: BatchIterator, config: Any,
          out: Output, frozen_prefixes: Sequence[str] = (),
          mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """Trains `model` for `config.steps` steps, resuming from `out.checkpoints` if any.

  Args:
    model: the network; its `nnx.Param`s are trained, other variables pass through
      (they are updated only if the model itself changes them in its call).
    loss_fn: `loss_fn(model, batch, rng, train=True) -> (loss, metrics)`, scalar loss
      and a dict of scalar arrays; `rng` is a fresh key per step (for dropout).
    batches: iterator of dicts of global `jax.Array`s `[B, ...]` split on `data`, with
      `get_state()`/`set_state()` (JSON-serialisable position).
    config: keys of `defaults.train_config()`.
    out: where the checkpoints and the metrics log go.
    frozen_prefixes: parameter paths that receive no updates.
    mesh: the mesh of the batches (default: all devices).

  Returns:
    `model`, updated in place with the trained variables.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  steps = int(config.steps)
  folder = os.path.dirname(out.metrics)
  with io.writing(folder):
    io.makedirs(folder)
  graphdef, params, rng_state, rest = split_model(model)
  tx = optim.make_optimizer(params, config, frozen_prefixes)
  train_step = make_train_step(graphdef, tx, loss_fn, optim.make_schedule(config),
                               rng_state, mesh, frozen_prefixes)
  rng = sharding.replicated_key(int(config.seed), mesh)

  with Checkpointer(out.checkpoints, keep=config.keep, save_every=config.ckpt_every) as ckpt:
    state, step = _restore_or_init(ckpt, tx, params, rest, batches, mesh)
    saved = step
    vote = _StopVote(mesh)
    with _MetricsLog(out, step, config) as log:
      in_step = False  # True from taking a batch until the step's new state exists.
      try:
        while step < steps:
          in_step = True
          batch = _next_batch(batches, step, steps, out.name)
          state, metrics = train_step(state, batch, rng)
          step, in_step = step + 1, False
          log.add(step, metrics, _batch_size(batch))
          stop = vote.stop()
          if step % ckpt.save_every == 0 or step == steps or stop:
            log.flush()
            ckpt.save(step, state, _data_state(batches))
            saved = step
          if stop and step < steps:
            ckpt.wait()
            raise stopping.stopped(
                f"at step {step} of {steps}, after saving checkpoint "
                f"{os.path.join(ckpt.directory, str(step))}", stop)
        log.flush()
      except KeyboardInterrupt:
        if not in_step and step > saved:
          _save_on_interrupt(ckpt, step, state, batches, log)
        raise

  nnx.update(model, nnx.State(state["params"]), nnx.State(state["rest"]))
  return model
