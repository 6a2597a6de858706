"""Moves CAMs between a workdir and other methods' files (docs/interop.md).

  python -m affinity_jax.cams import --format=psa|irn|npz --from=DIR --workdir=W \
      [--config=CONFIG [--config.KEY=VALUE ...]]
  python -m affinity_jax.cams export --format=psa|irn|npz --to=DIR --workdir=W

`import` fills the workdir's CAM store (`cam_maps/`) from one file per image of its label
splits (`labels.cam_files`: psa's `{class index: CAM}` `.npy` dicts, IRN's `cam_out`
dicts, or `.npz` files with `keys` and `cams`); `main` on the same workdir then goes on
from aff_labels (or, with `--config.aff.weights`, straight to infer_rw), skipping the
classifier. A fresh workdir needs `--config` (claimed as `main` claims it); an existing
one uses the config it was written with. The `.npy` files are pickles: they are read by
a restricted unpickler that refuses anything but NumPy arrays, dicts and numbers.

`export` writes the workdir's CAMs in another format, e.g. for psa's `infer_aff.py
--cam_dir`.
"""

import contextlib
import os
import sys
from typing import Sequence

from affinity_jax import config_lib
from affinity_jax import io
from affinity_jax import main as command_line
from affinity_jax import workdir as workdir_layout
from affinity_jax.errors import UserError

COMMANDS = ("import", "export")
USAGE = ("usage: python -m affinity_jax.cams import --format=psa|irn|npz --from=DIR "
         "--workdir=W [--config=CONFIG ...] | export --format=psa|irn|npz --to=DIR --workdir=W")


def parse(argv: Sequence[str]) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
  """(command, {flag: value}, config overrides) of the command line."""
  args = list(argv)
  if not args or args[0] not in COMMANDS:
    raise UserError(f"first argument: one of {', '.join(COMMANDS)}; {USAGE}")
  command, values, overrides = args[0], {}, []
  allowed = {"import": ("format", "from", "workdir", "config"),
             "export": ("format", "to", "workdir")}[command]
  for name, value in command_line.flags(args[1:], USAGE):
    if name.startswith("config.") and command == "import":
      overrides.append((name[len("config."):], value))
    elif name in allowed:
      values[name] = value
    else:
      raise UserError(f"unknown flag --{name} for {command}; flags are "
                      f"{', '.join('--' + a for a in allowed)}")
  needed = [a for a in allowed if a != "config"]
  for name in needed:
    if not values.get(name):
      raise UserError(f"missing --{name}=...; {USAGE}")
  if overrides and "config" not in values:
    raise UserError("--config.KEY overrides need --config")
  return command, values, overrides


def main(argv: Sequence[str]) -> None:
  command, values, overrides = parse(argv)
  from affinity_jax.labels import cam_files
  cam_files.checked_format(values["format"])
  workdir = values["workdir"]
  if "config" in values:
    config = config_lib.load_config(values["config"], overrides)
    config_name = values["config"]
  else:
    if not io.exists(os.path.join(workdir, workdir_layout.CONFIG)):
      raise UserError(f"workdir {workdir} has no {workdir_layout.CONFIG}: "
                      + ("pass --config=... to start it" if command == "import"
                         else "not a workdir"))
    config_name, config = workdir_layout.saved_config(workdir)
  from absl import logging  # TFDS logs a warning per custom scenes config; keep errors.
  logging.set_verbosity(logging.ERROR)
  from affinity_jax.stages import cam as cam_stage  # Heavy imports after argument errors.
  from affinity_jax import sharding
  from affinity_jax.stages import common

  with contextlib.ExitStack() as stack:
    if command == "import":
      stack.enter_context(workdir_layout.lock(workdir))
      workdir_layout.claim(config, workdir, config_name)
    ctx = common.Context(config, workdir, sharding.make_mesh())
    if command == "export":
      n = cam_stage.export_cams(ctx, values["to"], values["format"])
      print(f"wrote the {values['format']} CAMs of {n} images to {values['to']}")
      return
    if ctx.files.cams.finished():
      raise UserError(f"{ctx.files.cams.directory}: this workdir's CAMs are complete "
                      "already; import into a fresh --workdir")
    with io.writing(ctx.data_dir):
      ctx.prepare_data()
    cam_stage.import_cams(ctx, values["from"], values["format"])
    print(f"next: python -m affinity_jax.main --config={config_name} --workdir={workdir}"
          f"{''.join(f' --config.{k}={v}' for k, v in overrides)}")


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  command_line.run_main(main)
  sys.exit(0)
