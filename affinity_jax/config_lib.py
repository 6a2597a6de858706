"""Configs: loading `configs/NAME.py[:arg]`, command-line overrides, what a workdir
keeps of its config.

A config file is a Python module with `get_config(arg)` returning an
`ml_collections.ConfigDict`; its variants (`:arg`) go through `apply_variant`. Any
error while it runs becomes a one-line `UserError` naming the file and line. The
command line is

  python -m affinity_jax.main --config=configs/NAME.py[:arg] --workdir=DIR [--mode=M]
      [--config.a.b=VALUE ...]

Overrides may only set keys the config already has, with a value of the key's type
(ints are accepted for floats); anything else is a one-line `UserError`. The result is
locked, so code cannot add keys by mistake either.

A workdir belongs to one experiment (`affinity_jax.workdir.claim`): the first run keeps
its config there (`to_record`); later runs must agree with it on every key except the
few that change neither what has been computed nor how an interrupted stage resumes
(`FREE_LEAVES`, `FREE_KEYS`, `FREE_GROUPS`; `first_difference`).
"""

import ast
import difflib
import importlib.util
import inspect
import json
import os
import traceback
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from affinity_jax.errors import UserError

# What may change between runs in one workdir: keys that change neither what has been
# computed nor how an interrupted stage resumes. By last name: run length (to extend
# training), logging, checkpoint frequency and retention.
FREE_LEAVES = frozenset({"steps", "log_every", "ckpt_every", "keep", "progress"})
# By full name: worker processes. Each image's CRF labels do not depend on the CRF's;
# a training stage resumes its input stream with the grain worker count saved in its
# checkpoint, whatever `data.num_workers` (or the host's cores, for -1) says now.
FREE_KEYS = frozenset({"crf.num_workers", "data.num_workers"})
# Groups whose every key may change: how processes find each other.
FREE_GROUPS = ("distributed",)
# Keys only the segmentation net reads (its training and its score in `eval`): free to
# change until it has started (`workdir.claim`), so that a workdir of a config without
# the net (`:cpu`) can go on with it (`:cpu_full`).
SEG_KEYS = ("seg", "data.seg_eval_split")
# Keys added to `defaults` after workdirs were written without them, each with the value
# that does what ran before it existed: a workdir that lacks one reads as that value.
# Add a key here when you add it to `defaults`. (`data.infer_canvases` is the one whose
# default differs: a VOC workdir written with tight padding refuses it.)
ADDED_KEYS = {"cam.imagenet_prior": False, "aff.level_stages": (),
              "rw.dcrf_unary_weight": 1.0, "rw.flip": False, "rw.normalize": "none",
              "rw.scales": (1.0,), "data.infer_canvases": (),
              "cam.weights": "", "aff.weights": "", "seg.weights": "", "cam.cams_from": "",
              "cam.cams_format": "psa", "seg.head_width": 512}

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}` for ConfigDicts and plain dicts."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _module_path(path: str) -> str:
  for candidate in (path, os.path.join(_REPO_ROOT, path)):
    if os.path.isfile(candidate):
      return candidate
  raise UserError(f"config file {path} does not exist")


def _config_error(path: str, error: Exception) -> UserError:
  """`error`, raised while running the config file at `path`, as one line naming its line.

  The line is where the config file's own code was when the error arose (the innermost
  frame in that file), or the syntax error's line.
  """
  if isinstance(error, UserError):
    return UserError(f"{path}: {error}")
  if isinstance(error, SyntaxError):  # Perhaps in a module the config file imports.
    other = error.filename and os.path.abspath(error.filename) != os.path.abspath(path)
    return UserError(f"{error.filename if other else path}:{error.lineno}: "
                     f"{type(error).__name__}: {error.msg}")
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  where = f"{path}:{lines[-1]}" if lines else path
  what = type(error).__name__
  if str(error):
    what += f": {str(error).splitlines()[0]}"
  return UserError(f"{where}: {what}")


def load_config(spec: str, overrides: Mapping[str, str] | Iterable[tuple[str, str]] = ()
                ) -> ml_collections.ConfigDict:
  """Builds the config named by `spec` and applies `overrides`; the result is locked.

  Args:
    spec: `path/to/NAME.py` or `path/to/NAME.py:arg` (relative paths are tried from the
      current folder, then from the repository root).
    overrides: dotted key -> value as typed on the command line.

  Raises:
    UserError: a bad spec or override, or any error while running the config file
      (a syntax error, an exception in `get_config`), named by file and line.
  """
  path, _, arg = spec.partition(":")
  path = _module_path(path)
  module_spec = importlib.util.spec_from_file_location(
      "affinity_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # The config file is user code: where it failed, in one line.
    raise _config_error(path, e) from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  if arg and not takes_arg:
    raise UserError(f"config file {path} takes no argument but got {arg!r}")
  try:
    config = module.get_config(arg or None) if takes_arg else module.get_config()
  except Exception as e:
    raise _config_error(path, e) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config in {path} must return an ml_collections.ConfigDict")
  config = ml_collections.ConfigDict(config)  # Own copy, unlocked.
  apply_overrides(config, overrides)
  config.lock()
  return config


def apply_variant(config: ml_collections.ConfigDict, arg: str | None,
                  variants: Mapping[str, Callable[[ml_collections.ConfigDict], Any]]
                  ) -> ml_collections.ConfigDict:
  """Applies the variant named `arg` (`configs/NAME.py:arg`) to `config`, returns it.

  For config files: `return config_lib.apply_variant(c, arg, VARIANTS)` at the end of
  `get_config(arg)`, with `VARIANTS = {name: function changing the config in place}`.
  None or "" is the config itself.

  Raises:
    UserError: `arg` names no variant (with the closest names and the valid ones).
  """
  if arg:
    if arg not in variants:
      valid = ", ".join(f":{name}" for name in variants)
      raise UserError(f"unknown variant {arg!r}{_did_you_mean(arg, variants, ':')} "
                      f"(variants: {valid} or none)")
    variants[arg](config)
  return config


def _parse_value(key: str, text: str, current: Any) -> Any:
  def bad(kind):
    return UserError(f"config key {key}: {text!r} is not a valid {kind}")
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("bool (true/false)")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("int") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("float") from None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise bad(type(current).__name__) from None
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  return value


def _did_you_mean(word: str, known: Iterable[str], prefix: str = "") -> str:
  """A "did you mean" clause with the names in `known` closest to `word` ("" if none)."""
  close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
  return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _unknown(key: str, known: Iterable[str]) -> UserError:
  return UserError(f"unknown config key {key}{_did_you_mean(key, known)}")


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
  """Sets each dotted `key` to its parsed `value` (strings as on the command line)."""
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for key, text in items:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _unknown(key, flatten(config))
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise _unknown(key, flatten(config))
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"config key {key} is a group; set its keys ({key}.NAME=...) instead")
    value = _parse_value(key, text, current) if isinstance(text, str) else text
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UserError(f"config key {key}: cannot set {value!r}: "
                      f"{str(e).splitlines()[0]}") from None


def _jsonable(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _free(key: str) -> bool:
  return (key in FREE_KEYS or key.rsplit(".", 1)[-1] in FREE_LEAVES
          or key.split(".", 1)[0] in FREE_GROUPS)


def _with_added_keys(saved: dict) -> dict:
  """A saved config with the keys of `ADDED_KEYS` it predates, at their old behaviour."""
  out = json.loads(json.dumps(saved))
  for key, value in ADDED_KEYS.items():
    *parents, leaf = key.split(".")
    group = out
    for name in parents:
      group = group.get(name) if isinstance(group, dict) else None
    if isinstance(group, dict) and leaf not in group:
      group[leaf] = list(value) if isinstance(value, tuple) else value
  return out


def to_record(config: ml_collections.ConfigDict, config_name: str) -> dict:
  """What a workdir keeps of the config that wrote it: `{"config_name", "config"}`."""
  return {"config_name": config_name, "config": _jsonable(config)}


def check_record(record: Any, where: str) -> dict:
  """`record` if it is one `to_record` made; else a `UserError` naming `where`."""
  if not (isinstance(record, dict) and isinstance(record.get("config"), dict)
          and isinstance(record.get("config_name"), str)):
    raise UserError(f"{where}: not a config written by affinity_jax (no config_name and "
                    "config); use another --workdir")
  return record


def from_record(record: dict) -> tuple[str, ml_collections.ConfigDict]:
  """(config name, the locked config, tuples restored, `ADDED_KEYS` it predates filled
  in) of a `to_record`."""
  config = ml_collections.ConfigDict(_tuples(_with_added_keys(record["config"])))
  config.lock()
  return record["config_name"], config


def _tuples(value):
  """JSON lists back to the tuples configs hold."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def first_difference(saved: dict, current: dict,
                     also_free: tuple[str, ...] = ()) -> tuple[str, Any, Any] | None:
  """The first key, not free to change, whose value differs between two `to_record`s
  ((key, saved value, current value); `"<missing>"` for a key one lacks), or None.

  A key of `ADDED_KEYS` the saved config lacks counts as its value there. `also_free`
  frees more keys, each named or under a named group (e.g. `SEG_KEYS`).
  """
  old = flatten(_with_added_keys(saved["config"]))
  new = flatten(current["config"])
  free = lambda k: _free(k) or any(k == g or k.startswith(g + ".") for g in also_free)
  differing = sorted(k for k in set(old) | set(new)
                     if old.get(k, "<missing>") != new.get(k, "<missing>") and not free(k))
  if not differing:
    return None
  key = differing[0]
  return key, old.get(key, "<missing>"), new.get(key, "<missing>")


