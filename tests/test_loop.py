"""The generic train loop: sharding invariance, resume after interruption, logs."""

import errno
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from affinity_jax import defaults
from affinity_jax import sharding
from affinity_jax.errors import UserError
from affinity_jax.training import loop, optim
from affinity_jax.training.checkpoint import Checkpointer


class FrozenStat(nnx.Variable):
  """A non-trainable variable, like frozen BatchNorm statistics."""


class Backbone(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Linear(6, 8, rngs=rngs)
    self.shift = FrozenStat(jnp.linspace(-0.5, 0.5, 8))

  def __call__(self, x):
    return jax.nn.relu(self.conv(x) - self.shift[...])


class Toy(nnx.Module):

  def __init__(self, rngs):
    self.backbone = Backbone(rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, *, key=None):
    h = self.backbone(x)
    if key is not None:  # Dropout with an explicit key.
      h = jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0)
    return self.head(h)


def loss_fn(model, batch, rng, train=True):
  logits = model(batch["x"], key=rng if train else None)
  logp = jax.nn.log_softmax(logits)
  loss = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
  return loss, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


class ToyBatches:
  """Deterministic batches: batch i depends only on i; position is the state."""

  def __init__(self, mesh, batch_size=8):
    self.mesh, self.batch_size, self.pos = mesh, batch_size, 0

  def __next__(self):
    r = np.random.default_rng(self.pos)
    self.pos += 1
    batch = {"x": r.normal(size=(self.batch_size, 6)).astype(np.float32),
             "y": r.integers(0, 3, self.batch_size).astype(np.int32)}
    return sharding.shard_batch(batch, self.mesh)

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def toy_config(**kw):
  config = defaults.train_config()
  config.update(dict(steps=6, lr=0.05, ckpt_every=100, log_every=1, progress=False,
                     momentum=0.9))
  config.update(kw)
  return config


def params_of(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_step_is_the_same_on_8_devices_and_on_1():
  assert jax.device_count() == 8
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    model = Toy(nnx.Rngs(0))
    graphdef, params, rngs, rest = loop.split_model(model)
    config = toy_config()
    tx = optim.make_optimizer(params, config, ("backbone/conv/bias",))
    step = loop.make_train_step(graphdef, tx, loss_fn, optim.make_schedule(config),
                                rngs, mesh)
    state = loop.create_train_state(tx, params, rest, mesh)
    batches = ToyBatches(mesh)
    rng = jax.random.key(3)
    for _ in range(2):
      old_kernel = state["params"]["head"]["kernel"]
      state, metrics = step(state, next(batches), rng)
      assert old_kernel.is_deleted()  # Donated: updated in place.
    assert state["params"]["backbone"]["conv"]["kernel"].sharding.is_fully_replicated
    results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state["params"])))
  (loss1, p1), (loss8, p8) = results
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p8)
  # The frozen bias did not move; the trained ones did.
  init = params_of(Toy(nnx.Rngs(0)))
  np.testing.assert_array_equal(p8["backbone"]["conv"]["bias"], init["backbone"]["conv"]["bias"])
  assert not np.allclose(p8["head"]["kernel"], init["head"]["kernel"])


def test_split_step_equals_value_and_grad_in_one_function():
  # The step runs its forward (jax.vjp) and backward as two executables; the result is
  # that of jax.value_and_grad and the optimiser in one, dropout and frozen bias included.
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = Toy(nnx.Rngs(0))
  graphdef, params, rngs, rest = loop.split_model(model)
  config = toy_config()
  frozen = ("backbone/conv/bias",)
  tx = optim.make_optimizer(params, config, frozen)
  step = loop.make_train_step(graphdef, tx, loss_fn, optim.make_schedule(config),
                              rngs, mesh, frozen)
  rng = jax.random.key(3)
  batch = next(ToyBatches(mesh))

  @jax.jit
  def reference(params, opt_state):
    def loss_of(p):
      p = optim.stop_frozen_gradients(p, frozen)
      m = nnx.merge(graphdef, nnx.State(p), nnx.State(rngs), nnx.State(rest))
      return loss_fn(m, batch, jax.random.fold_in(rng, 0), train=True)
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, metrics, optax.apply_updates(params, updates)

  want_loss, want_metrics, want_params = reference(params, tx.init(params))
  state = loop.create_train_state(tx, params, rest, mesh)
  state, metrics = step(state, batch, rng)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["acc"], want_metrics["acc"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state["params"], want_params)
  assert int(state["step"]) == 1


def out(folder) -> loop.Output:
  """A training folder laid out as a workdir's: ckpt/ and metrics.jsonl."""
  return loop.Output(str(folder / "ckpt"), str(folder / "metrics.jsonl"), folder.name)


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
  mesh = sharding.make_mesh()
  config = toy_config(steps=6, ckpt_every=2)

  full = loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config,
                    out(tmp_path / "full"), mesh=mesh)

  # "Kill" after 4 steps: a run configured for 4 steps leaves checkpoints 2 and 4;
  # then a new model and a new iterator resume to 6. (Same schedule: steps fixed to 6.)
  class Stop(Exception):
    pass

  class StopAfter(ToyBatches):
    def __next__(self):
      if self.pos == 5:  # Mid-way between checkpoints 4 and 6: step 5 is lost.
        raise Stop()
      return super().__next__()

  with pytest.raises(Stop):
    loop.train(Toy(nnx.Rngs(0)), loss_fn, StopAfter(mesh), config, out(tmp_path / "cut"),
               mesh=mesh)
  batches = ToyBatches(mesh)
  resumed = loop.train(Toy(nnx.Rngs(1)), loss_fn, batches, config, out(tmp_path / "cut"),
                       mesh=mesh)
  assert batches.pos == 6  # Continued from position 4, not from 0.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params_of(full), params_of(resumed))
  # The non-trainable variable passes through unchanged.
  shift = nnx.to_pure_dict(nnx.state(resumed, FrozenStat))["backbone"]["shift"]
  np.testing.assert_array_equal(shift, np.asarray(jnp.linspace(-0.5, 0.5, 8)))

  logs = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
          for d in ("full", "cut")]
  assert [r["step"] for r in logs[1]] == list(range(1, 7))
  for a, b in zip(*logs):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["lr"] == pytest.approx(b["lr"])
  assert {"step", "loss", "lr", "images_per_s", "acc"} <= set(logs[0][0])
  assert logs[0][0]["lr"] == pytest.approx(0.05)

  # Running again when finished does nothing and returns the trained model.
  again = loop.train(Toy(nnx.Rngs(2)), loss_fn, ToyBatches(mesh), config,
                     out(tmp_path / "cut"), mesh=mesh)
  jax.tree.map(np.testing.assert_array_equal, params_of(again), params_of(resumed))


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, monkeypatch):
  mesh = sharding.make_mesh()
  config = toy_config(steps=5, ckpt_every=100)
  full = loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config,
                    out(tmp_path / "full"), mesh=mesh)

  class InterruptingBar(loop.Progress):
    calls = 0

    def update(self, n=1):
      InterruptingBar.calls += 1
      if InterruptingBar.calls == 3:  # Ctrl-C while logging step 3, after its line.
        raise KeyboardInterrupt
      return super().update(n)

  monkeypatch.setattr(loop, "Progress", InterruptingBar)
  with pytest.raises(KeyboardInterrupt):
    loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config, out(tmp_path / "cut"),
               mesh=mesh)
  monkeypatch.undo()
  assert (tmp_path / "cut" / "ckpt" / "4").is_dir()  # Step 4 was queued when it came.
  batches = ToyBatches(mesh)
  resumed = loop.train(Toy(nnx.Rngs(1)), loss_fn, batches, config, out(tmp_path / "cut"),
                       mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params_of(full), params_of(resumed))
  lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(l)["step"] for l in lines]
  assert steps == [1, 2, 3, 4, 5]


# Paths whose writes fail as on a full disk (None: none): an audit hook, since orbax
# writes from its own threads. Hooks cannot be removed; this one is idle when None.
_FULL_DISK_UNDER = None


def _full_disk(event, args):
  if _FULL_DISK_UNDER is None or event not in ("open", "os.rename"):
    return
  path = args[1] if event == "os.rename" else args[0]
  writes = event != "open" or (len(args) > 2 and isinstance(args[2], int)
                               and args[2] & (os.O_WRONLY | os.O_RDWR))
  if writes and isinstance(path, (str, os.PathLike)) and \
      os.fspath(path).startswith(_FULL_DISK_UNDER):
    raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))


sys.addaudithook(_full_disk)


def test_a_checkpoint_the_disk_cannot_hold_is_one_line_and_resume_skips_it(tmp_path):
  global _FULL_DISK_UNDER
  mesh = sharding.make_mesh()
  config = toy_config(steps=6, ckpt_every=2)
  full = loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config,
                    out(tmp_path / "full"), mesh=mesh)
  ckpt = str(tmp_path / "cut" / "ckpt")
  _FULL_DISK_UNDER = os.path.join(ckpt, "4")   # Step 4's folder, temporary or final.
  try:
    with pytest.raises(UserError) as e:
      loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config,
                 out(tmp_path / "cut"), mesh=mesh)
  finally:
    _FULL_DISK_UNDER = None
  message = str(e.value)
  assert message.startswith(f"cannot write {ckpt}") and "disk full" in message, message
  assert "\n" not in message
  with Checkpointer(ckpt) as saved:
    assert saved.latest_step() == 2
  batches = ToyBatches(mesh)
  resumed = loop.train(Toy(nnx.Rngs(1)), loss_fn, batches, config, out(tmp_path / "cut"),
                       mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params_of(full), params_of(resumed))
  steps = [json.loads(l)["step"]
           for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
  # pytest's captured stderr is no terminal, like nohup or a CI log: timed plain lines.
  monkeypatch.setenv("AFFINITY_JAX_PROGRESS_S", "0")
  mesh = sharding.make_mesh()
  config = toy_config(steps=3, progress=True)
  loop.train(Toy(nnx.Rngs(0)), loss_fn, ToyBatches(mesh), config, out(tmp_path / "aff"),
             mesh=mesh)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("aff: ")]
  assert lines[0].startswith("aff: 0/3 (0%)")
  assert [l.split(" ", 2)[1] for l in lines] == ["0/3", "1/3", "2/3", "3/3"]
  for field in ("step/s", "loss=", "lr=5.00e-02", "img_s=", "elapsed", "ETA"):
    assert field in lines[1], (field, lines[1])


def test_input_positions_resume_per_process_and_only_with_as_many():
  """A multi-host checkpoint holds each host's position; this (single) process gets
  its own, and a checkpoint of 2 processes is refused with the reason."""
  assert loop._own_data_state({"pos": 3}, "d") == {"pos": 3}
  assert loop._own_data_state({loop.PER_PROCESS: [{"pos": 5}]}, "d") == {"pos": 5}
  with pytest.raises(UserError, match=r"checkpoint d was saved by 2 process\(es\)"):
    loop._own_data_state({loop.PER_PROCESS: [{"pos": 1}, {"pos": 2}]}, "d")
  assert sharding.gather_json({"pos": 7}) == [{"pos": 7}]
