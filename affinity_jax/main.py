"""Runs AffinityNet stages from the command line.

  python -m affinity_jax.main --config=configs/scenes.py --workdir=/tmp/scenes

`--mode` picks one stage (`train_cam`, `infer_cam`, `aff_labels`, `train_aff`,
`infer_rw`, `train_seg`, `eval`) or `all` (the default), which runs every stage in
order and skips those whose outputs are complete. Rerunning a killed command resumes.
"""

import os
import sys
import traceback
from typing import Sequence

from affinity_jax import config_lib
from affinity_jax import stopping
from affinity_jax import workdir as workdir_layout


def main(argv: Sequence[str]) -> None:
  cl = config_lib.parse_command_line(argv)
  single = not cl.config.distributed.coordinator_address
  if single and cl.mode != "eval":  # Refused in a second, before jax is imported.
    workdir_layout.refuse_if_in_use(cl.workdir)
  from absl import logging  # TFDS logs a warning per custom scenes config; keep errors.
  logging.set_verbosity(logging.ERROR)
  from affinity_jax.stages import pipeline  # Heavy imports after argument errors.

  config_lib.check_mode(cl.mode, pipeline.MODES)
  if single:
    pipeline.run(cl.config, cl.config_name, cl.workdir, cl.mode)
    return
  try:
    pipeline.run(cl.config, cl.config_name, cl.workdir, cl.mode)
  except BaseException as e:  # noqa: BLE001 -- every failure ends the process at once.
    exit_at_once(e)


STOP_WAIT_S = 60  # How long a stopped host waits for the others to stop too.


def exit_at_once(error: BaseException) -> None:
  """Ends a process of a multi-host run that failed, without jax's shutdown.

  A normal exit waits in `jax.distributed.shutdown` for every other process (up to
  5 minutes) while they wait in a collective for this one. Exiting at once closes
  the collectives' connections: the others fail within seconds (a collective's
  error) or at most `distributed.heartbeat_timeout_s`.
  """
  code = config_lib.report_stop(error)   # A UserError or an interrupt: its one line.
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
  config_lib.run_main(main)
