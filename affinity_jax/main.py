"""Runs AffinityNet stages from the command line.

  python -m affinity_jax.main --config=configs/scenes.py --workdir=/tmp/scenes

`--mode` picks one stage (`train_cam`, `infer_cam`, `aff_labels`, `train_aff`,
`infer_rw`, `train_seg`, `eval`) or `all` (the default), which runs every stage in
order and skips those whose outputs are complete. Rerunning a killed command resumes.
"""

import dataclasses
import os
import sys
import traceback
from typing import Any, Callable, Sequence

import ml_collections

from affinity_jax import config_lib
from affinity_jax import stopping
from affinity_jax import workdir as workdir_layout
from affinity_jax.errors import UserError


def main(argv: Sequence[str]) -> None:
  cl = parse_command_line(argv)
  single = not cl.config.distributed.coordinator_address
  if single and cl.mode != "eval":  # Refused in a second, before jax is imported.
    workdir_layout.refuse_if_in_use(cl.workdir)
  from absl import logging  # TFDS logs a warning per custom scenes config; keep errors.
  logging.set_verbosity(logging.ERROR)
  from affinity_jax.stages import pipeline  # Heavy imports after argument errors.

  check_mode(cl.mode, pipeline.MODES)
  if single:
    pipeline.run(cl.config, cl.config_name, cl.workdir, cl.mode)
    return
  try:
    pipeline.run(cl.config, cl.config_name, cl.workdir, cl.mode)
  except BaseException as e:  # noqa: BLE001 -- every failure ends the process at once.
    exit_at_once(e)


@dataclasses.dataclass
class CommandLine:
  """The parsed `affinity_jax.main` command line."""
  config: ml_collections.ConfigDict
  config_name: str
  workdir: str
  mode: str


def flags(argv: Sequence[str], usage: str) -> list[tuple[str, str]]:
  """(name, value) of each `--name=value` or `--name value` of `argv`, in order.

  Raises:
    UserError: an argument that is no flag (the message ends with `usage`), or a last
      flag without a value.
  """
  args, out, i = list(argv), [], 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--"):
      raise UserError(f"unexpected argument {arg!r}; {usage}")
    name, eq, value = arg[2:].partition("=")
    if not eq:
      if i + 1 >= len(args):
        raise UserError(f"flag --{name} needs a value")
      i += 1
      value = args[i]
    out.append((name, value))
    i += 1
  return out


def parse_command_line(argv: Sequence[str], modes: Sequence[str] = (),
                       default_mode: str = "all") -> CommandLine:
  """Parses `--config=... --workdir=... [--mode=...] [--config.KEY=VALUE ...]`.

  Both `--flag=value` and `--flag value` work. `modes`, when given, lists valid modes.
  """
  values: dict[str, str] = {}
  overrides: list[tuple[str, str]] = []
  for name, value in flags(argv, "flags are --config, --workdir, --mode"):
    if name.startswith("config."):
      overrides.append((name[len("config."):], value))
    elif name in ("config", "workdir", "mode"):
      values[name] = value
    else:
      raise UserError(f"unknown flag --{name}; flags are --config, --workdir, --mode, "
                      "--config.KEY")
  for name in ("config", "workdir"):
    if not values.get(name):
      raise UserError(f"missing --{name}=...")
  mode = values.get("mode", default_mode)
  check_mode(mode, modes)
  config = config_lib.load_config(values["config"], overrides)
  return CommandLine(config, values["config"], values["workdir"], mode)


def check_mode(mode: str, modes: Sequence[str]) -> None:
  """Raises a `UserError` listing `modes` when `mode` is not one (no check if empty)."""
  if modes and mode not in modes:
    raise UserError(f"unknown --mode={mode}; choose one of {', '.join(modes)}")


def report_stop(error: BaseException) -> int | None:
  """For a `UserError`, a stop on a signal or an interrupt: prints its one line on
  stderr and returns the exit status (2; 128 + the signal, `stopping.Stopped`; 130);
  None for any other exception."""
  if isinstance(error, UserError):
    print(f"error: {error}", file=sys.stderr)
    return 2
  if isinstance(error, stopping.Stopped):
    print(error, file=sys.stderr)
    return error.code
  if isinstance(error, KeyboardInterrupt):
    print("interrupted; run the same command again to resume", file=sys.stderr)
    return 130
  return None


def run_main(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> None:
  """Runs `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit 2."""
  try:
    main(sys.argv[1:] if argv is None else list(argv))
  except (UserError, stopping.Stopped, KeyboardInterrupt) as e:
    sys.exit(report_stop(e))


STOP_WAIT_S = 60  # How long a stopped host waits for the others to stop too.


def exit_at_once(error: BaseException) -> None:
  """Ends a process of a multi-host run that failed, without jax's shutdown.

  A normal exit waits in `jax.distributed.shutdown` for every other process (up to
  5 minutes) while they wait in a collective for this one. Exiting at once closes
  the collectives' connections: the others fail within seconds (a collective's
  error) or at most `distributed.heartbeat_timeout_s`.
  """
  code = report_stop(error)   # A UserError or an interrupt: its one line.
  if isinstance(error, stopping.Stopped):
    # Every host stops: the first to exit would end the others' coordination service
    # (process 0 runs it) while they still save their step or image.
    from affinity_jax import sharding
    sharding.wait_for_all("affinity_jax_stopped", STOP_WAIT_S)
  if code is None and isinstance(error, SystemExit):
    code = error.code if isinstance(error.code, int) else 1
  elif code is None:
    hint = _hint(error)
    if not hint:  # A failure of this process: where it happened.
      traceback.print_exception(error)
    import jax  # "auto" runs learn their index from it.
    try:
      process_id = jax.process_index()
    except Exception:  # noqa: BLE001 -- jax.distributed.initialize itself failed.
      process_id = "?"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(f"error: process {process_id} failed: {type(error).__name__}: {first}"
          f"{hint}; run the same command again on every host to resume",
          file=sys.stderr)
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _hint(error: BaseException) -> str:
  text = str(error)
  if any(s in text for s in ("Gloo", "Connection closed", "heartbeat", "coordination")):
    return " (another process of the run has stopped: see its output for why)"
  return ""


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  run_main(main)
