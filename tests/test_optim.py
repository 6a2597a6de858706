"""Optimiser groups, multipliers, frozen parameters and the poly schedule, by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from affinity_jax.errors import UserError
from affinity_jax.training import optim


def config(**kw):
  c = ml_collections.ConfigDict(dict(optimizer="sgd", lr=0.1, schedule="poly", poly_power=0.9,
                                     steps=4, momentum=0.7, weight_decay=0.05))
  c.update(kw)
  return c


def random_params(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return {
      "backbone": {"conv": {"kernel": f(3, 2), "bias": f(2)},
                   "b2": {"kernel": f(2, 2)}, "b2_1": {"kernel": f(2)},
                   "stem": {"kernel": f(2), "bias": f(2)}},
      "head": {"kernel": f(2, 4), "bias": f(4)},
      "classifier": {"kernel": f(4, 1)},
  }


FROZEN = ("backbone/stem", "backbone/b2")


def test_labels():
  labels = optim.param_labels(random_params(), FROZEN)
  assert labels == {
      "backbone": {"conv": {"kernel": "pretrained_weight", "bias": "pretrained_bias"},
                   "b2": {"kernel": "frozen"}, "b2_1": {"kernel": "pretrained_weight"},
                   "stem": {"kernel": "frozen", "bias": "frozen"}},
      "head": {"kernel": "new_weight", "bias": "new_bias"},
      "classifier": {"kernel": "new_weight"},
  }


def test_poly_schedule_values():
  sched = optim.make_schedule(config(lr=0.01, steps=10))
  for step, want in [(0, 0.01), (3, 0.01 * 0.7 ** 0.9), (9, 0.01 * 0.1 ** 0.9), (10, 0.0),
                     (12, 0.0)]:
    assert float(sched(step)) == pytest.approx(want, rel=1e-6, abs=1e-12)
  assert float(optim.make_schedule(config(schedule="constant"))(3)) == pytest.approx(0.1)


def test_sgd_updates_match_hand_computation():
  c = config()
  params = random_params()
  tx = optim.make_optimizer(params, c, FROZEN)
  state = tx.init(params)
  mult = {"pretrained_weight": 1, "pretrained_bias": 2, "new_weight": 10, "new_bias": 20,
          "frozen": 0}
  labels = jax.tree.leaves(optim.param_labels(params, FROZEN))
  want = [np.asarray(p) for p in jax.tree.leaves(params)]
  bufs = [np.zeros_like(p) for p in want]
  p = params
  for t in range(3):
    grads = random_params(seed=10 + t)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    lr_t = 0.1 * (1 - t / 4) ** 0.9
    for i, (g, label) in enumerate(zip(jax.tree.leaves(grads), labels)):
      g = np.asarray(g) + (0.05 * want[i] if label.endswith("weight") else 0.0)
      bufs[i] = 0.7 * bufs[i] + g
      want[i] = want[i] - mult[label] * lr_t * bufs[i]
  for got, w, label in zip(jax.tree.leaves(p), want, labels):
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-6, err_msg=label)
  # Frozen leaves exactly unchanged.
  np.testing.assert_array_equal(p["backbone"]["stem"]["bias"], params["backbone"]["stem"]["bias"])


def test_adam_and_bad_names():
  params = random_params()
  tx = optim.make_optimizer(params, config(optimizer="adam"), FROZEN)
  updates, _ = tx.update(random_params(1), tx.init(params), params)
  # Adam's first step moves each element by about lr * multiplier.
  np.testing.assert_allclose(np.abs(updates["head"]["bias"]), 0.1 * 20, rtol=1e-3)
  np.testing.assert_array_equal(updates["backbone"]["b2"]["kernel"], 0)
  with pytest.raises(UserError, match="optimizer"):
    optim.make_optimizer(params, config(optimizer="lamb"))
  with pytest.raises(UserError, match="schedule"):
    optim.make_schedule(config(schedule="cosine"))


def test_stop_frozen_gradients_zeroes_only_frozen_gradients():
  params = {"backbone": {"conv": {"kernel": jnp.ones(3), "bias": jnp.ones(2)}},
            "head": {"kernel": jnp.ones(4)}}
  grads = jax.grad(lambda p: sum(jnp.sum(v ** 2) for v in jax.tree.leaves(
      optim.stop_frozen_gradients(p, ("backbone/conv",)))))(params)
  assert not grads["backbone"]["conv"]["kernel"].any()
  assert not grads["backbone"]["conv"]["bias"].any()
  np.testing.assert_allclose(grads["head"]["kernel"], 2 * np.ones(4))
