"""Checkpointer: round trip with shardings and JSON position, keep N, foreign checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affinity_jax import sharding
from affinity_jax.errors import UserError
from affinity_jax.training.checkpoint import Checkpointer


def make_state(width=3):
  params = {"backbone": {"kernel": jnp.arange(2 * width, dtype=jnp.float32).reshape(2, width)},
            "head": {"bias": jnp.ones((4,))}}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = jax.tree.map(lambda x: x + 0.5, tx.init(params))
  return {"params": params, "rest": {"stat": jnp.full((2,), 7.0)}, "opt_state": opt_state,
          "step": jnp.asarray(5, jnp.int32)}


def test_round_trip_with_shardings_and_keep(tmp_path):
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  state = jax.device_put(make_state(), rep)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, save_every=5)
  assert ckpt.latest_step() is None
  assert not ckpt.maybe_save(3, state, {"pos": 3})
  for step in (5, 10, 15):
    assert ckpt.maybe_save(step, state, {"pos": step, "epoch": [1, 2]})
  ckpt.wait()
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["10", "15"]

  fresh = Checkpointer(str(tmp_path / "ckpt"))
  assert fresh.latest_step() == 15
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          make_state())
  restored, data = fresh.restore(abstract)
  assert data == {"pos": 15, "epoch": [1, 2]}
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(state))
  assert restored["params"]["backbone"]["kernel"].sharding == rep
  assert type(restored["opt_state"]) is type(state["opt_state"])

  # Iterators whose position is bytes (grain's DataLoader) round-trip too.
  fresh.save(20, state, b'{"pos": 20}\x00')
  assert fresh.restore(abstract)[1] == b'{"pos": 20}\x00'


def test_checkpoint_of_another_model_is_a_user_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, make_state(width=3))
  ckpt.wait()
  with pytest.raises(UserError) as e:
    Checkpointer(str(tmp_path / "ckpt")).restore(make_state(width=5))
  msg = str(e.value)
  assert str(tmp_path / "ckpt") in msg and "backbone/kernel" in msg
  assert "(2, 3)" in msg and "(2, 5)" in msg and "\n" not in msg

  other = make_state()
  other["params"]["neck"] = {"kernel": jnp.zeros((2,))}
  with pytest.raises(UserError, match="params/neck/kernel"):
    Checkpointer(str(tmp_path / "ckpt")).restore(other)
  with pytest.raises(UserError, match="holds no checkpoint"):
    Checkpointer(str(tmp_path / "empty")).restore(make_state())


def test_restore_model_reads_the_model_only(tmp_path):
  state = make_state()
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(5, state, {"pos": 5})
  ckpt.wait()
  rep = sharding.replicated(sharding.make_mesh())
  model_only = {k: state[k] for k in ("params", "rest")}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          model_only)
  restored = Checkpointer(str(tmp_path / "ckpt")).restore_model(abstract)
  assert set(restored) == {"params", "rest"}   # No optimiser state, step or position.
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(model_only))
  assert restored["params"]["head"]["bias"].sharding == rep
  model_only["params"]["backbone"]["kernel"] = jnp.zeros((2, 5))
  with pytest.raises(UserError, match="backbone/kernel"):
    Checkpointer(str(tmp_path / "ckpt")).restore_model(model_only)
