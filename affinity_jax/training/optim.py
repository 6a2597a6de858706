"""The spec's optimiser rules in optax: poly schedule and parameter groups.

Each parameter gets one label from its path in the parameter tree:

| label              | which parameters                         | LR multiplier | weight decay |
|--------------------|------------------------------------------|---------------|--------------|
| `pretrained_weight`| under `backbone/`, leaf not named `bias` | 1             | yes          |
| `pretrained_bias`  | under `backbone/`, leaf named `bias`     | 2             | no           |
| `new_weight`       | elsewhere, leaf not named `bias`         | 10            | yes          |
| `new_bias`         | elsewhere, leaf named `bias`             | 20            | no           |
| `frozen`           | path equal to or under a frozen prefix   | 0 (no state)  | -            |

Weight decay is the SGD-style L2 term `wd * w` added to the gradient before momentum
(as `torch.optim.SGD` does), not decoupled AdamW decay. The learning rate of a group
is `multiplier * schedule(step)` applied after momentum, again as torch does with
per-group learning rates.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from affinity_jax.errors import UserError

MULTIPLIERS = {
    "pretrained_weight": 1.0,
    "pretrained_bias": 2.0,
    "new_weight": 10.0,
    "new_bias": 20.0,
}
FROZEN = "frozen"
PRETRAINED_ROOT = "backbone"


def path_str(path: Sequence[Any]) -> str:
  """`(DictKey('backbone'), DictKey('conv'), DictKey('kernel'))` -> `'backbone/conv/kernel'`.

  Attribute keys (e.g. the `.value` of an `nnx.Variable`) are not part of the name.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
  return "/".join(parts)


def _is_under(path: str, prefix: str) -> bool:
  prefix = prefix.strip("/")
  return path == prefix or path.startswith(prefix + "/")


def param_labels(params: Any, frozen_prefixes: Sequence[str] = ()) -> Any:
  """The group label of every parameter.

  Args:
    params: a pytree of arrays keyed by name (`nnx.State` of `nnx.Param` or its pure
      dict).
    frozen_prefixes: paths such as `"backbone/conv1a"`; a parameter is frozen when its
      path equals a prefix or lies under it (whole path components, so `"b2"` does not
      freeze `"b2_1"`).

  Returns:
    A pytree with the structure of `params` holding label strings.
  """
  def label(path, _):
    name = path_str(path)
    if any(_is_under(name, p) for p in frozen_prefixes):
      return FROZEN
    group = "pretrained" if _is_under(name, PRETRAINED_ROOT) else "new"
    kind = "bias" if name.rsplit("/", 1)[-1] == "bias" else "weight"
    return f"{group}_{kind}"
  return jax.tree_util.tree_map_with_path(label, params)


def stop_frozen_gradients(params: Any, frozen_prefixes: Sequence[str] = ()) -> Any:
  """`params` with the frozen ones (see `param_labels`) behind `jax.lax.stop_gradient`.

  Used inside a loss, it lets XLA drop the backward pass below the last frozen layer
  (the optimiser would discard those gradients anyway).
  """
  return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                      params, param_labels(params, frozen_prefixes))


def make_schedule(config: Any) -> optax.Schedule:
  """Base learning rate per step: `poly` = `lr * (1 - step / steps) ** poly_power`.

  `config.schedule` is `"poly"` (the spec) or `"constant"`. Step 0 uses the full rate,
  as the reference does; the rate is 0 from `config.steps` on.
  """
  lr, steps = float(config.lr), int(config.steps)
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "poly":
    power = float(config.get("poly_power", 0.9))

    def poly(step):
      frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
      return lr * (1.0 - frac) ** power
    return poly
  raise UserError(f"config key schedule={config.schedule!r} is unknown; use 'poly' or 'constant'")


def _group(config: Any, schedule: optax.Schedule, multiplier: float,
           decay: float) -> optax.GradientTransformation:
  parts = []
  if decay:
    parts.append(optax.add_decayed_weights(decay))
  if config.optimizer == "sgd":
    if config.momentum:
      parts.append(optax.trace(decay=float(config.momentum)))
  elif config.optimizer == "adam":
    parts.append(optax.scale_by_adam())
  else:
    raise UserError(f"config key optimizer={config.optimizer!r} is unknown; use 'sgd' or 'adam'")
  parts.append(optax.scale_by_schedule(lambda step: -multiplier * schedule(step)))
  return optax.chain(*parts)


def make_optimizer(params: Any, config: Any,
                   frozen_prefixes: Sequence[str] = ()) -> optax.GradientTransformation:
  """The optimiser for `params` with the spec's groups.

  Args:
    params: a parameter tree like the ones the optimiser will see (only paths matter;
      the labels are recomputed from the tree given to `init`/`update`).
    config: `optimizer` (`"sgd"` or `"adam"`), `lr`, `schedule`, `steps`, `momentum`
      (SGD only), `weight_decay`, optional `poly_power`.
    frozen_prefixes: parameter paths that get zero updates and no optimiser state.

  Returns:
    An optax transformation; its updates are to be added to the parameters
    (`optax.apply_updates`).
  """
  schedule = make_schedule(config)
  decay = float(config.weight_decay)
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  for label, multiplier in MULTIPLIERS.items():
    transforms[label] = _group(config, schedule, multiplier,
                               decay if label.endswith("weight") else 0.0)
  param_labels(params, frozen_prefixes)  # Fails early on a tree without names.
  return optax.multi_transform(transforms, lambda p: param_labels(p, frozen_prefixes))
