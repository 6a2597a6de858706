"""Logs every file this process opens for writing or renames, under one folder.

Put this folder first on PYTHONPATH with AFFINITY_JAX_AUDIT=<root>:<log file>; each
process appends lines `<who> <event> <path>`: who is `p<N>` for the process started
with `--config.distributed.process_id=N` (else `p?`), event `open` or `rename`, path
absolute (the destination of a rename). Only what Python does is seen (orbax's
array data goes through tensorstore, C++). tests/test_multihost.py reads the logs to
check who wrote each file of a workdir.
"""

import os
import sys

_spec = os.environ.get("AFFINITY_JAX_AUDIT", "")
if _spec:
  _root, _, _log = _spec.partition(":")
  _root = os.path.realpath(_root)
  _out = open(_log, "a", buffering=1)  # Opened before the hook, so never logged.
  _WRITE = os.O_WRONLY | os.O_RDWR
  _FLAG = "--config.distributed.process_id="
  _who = next((f"p{a[len(_FLAG):]}" for a in sys.orig_argv if a.startswith(_FLAG)), "p?")

  def _under(path) -> str | None:
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    if not isinstance(path, str):
      return None
    path = os.path.realpath(path)
    return path if path.startswith(_root + os.sep) else None

  def _hook(event, args):
    if event == "open" and len(args) >= 3 and isinstance(args[2], int) and args[2] & _WRITE:
      path = _under(args[0])
      if path:
        _out.write(f"{_who} open {path}\n")
    elif event == "os.rename":
      path = _under(args[1])
      if path:
        _out.write(f"{_who} rename {path}\n")

  sys.addaudithook(_hook)
