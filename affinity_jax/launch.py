r"""Runs N local processes of `affinity_jax.main` as the hosts of one multi-host job.

  python -m affinity_jax.launch --num_processes=2 --devices_per_process=4 -- \
      --config=configs/scenes.py:tiny --workdir=/tmp/mh

Each process gets `--devices_per_process` CPU devices (XLA's fake host devices) and
joins the others through `jax.distributed` on a free loopback port, so the run sees one
mesh of N x D devices, each process reading its share of every batch and writing into
the one shared workdir: what a TPU pod slice does with one process per host, on one
machine. The processes' output is prefixed with `[p<i>]`. When one process fails the
others get `--grace_s` seconds to fail on their own (they do: see the distributed
heartbeat in `sharding`), then are stopped; the launcher exits with the first
failure's status. Ctrl-C is passed on to every process (a rerun resumes).

Standard library only: the processes import JAX, this one never does.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port on 127.0.0.1 nobody listens on (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_environ(devices: int, environ=os.environ) -> dict:
  """`environ` for one process: CPU only, `devices` fake devices, no huge-page restart
  in between (the launcher's children are the processes the job counts)."""
  flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", environ.get("XLA_FLAGS", "")).strip()
  return dict(environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} {DEVICE_FLAG}={devices}".strip())


def process_command(main_args: Sequence[str], address: str, num_processes: int,
                    process_id: int) -> list[str]:
  """The command line of process `process_id`: `main_args` plus the distributed keys."""
  return [sys.executable, "-m", "affinity_jax.main", *main_args,
          f"--config.distributed.coordinator_address={address}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}"]


def _relay(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()


def launch(main_args: Sequence[str], num_processes: int, devices_per_process: int,
           port: int = 0, grace_s: float = 60.0) -> int:
  """Runs the processes to the end.

  Returns:
    0 when every process succeeded, else the exit status of the first that failed.
  """
  address = f"127.0.0.1:{port or free_port()}"
  env = process_environ(devices_per_process)
  procs, relays = [], []
  for i in range(num_processes):
    p = subprocess.Popen(process_command(main_args, address, num_processes, i), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1, start_new_session=True)
    t = threading.Thread(target=_relay, args=(p.stdout, f"[p{i}] ", sys.stdout), daemon=True)
    t.start()
    procs.append(p)
    relays.append(t)
  failed, deadline = None, None
  try:
    # Checks once more after the last process ended: when every process fails before the
    # first look, the failure is still reported.
    while True:
      running = any(p.poll() is None for p in procs)
      for i, p in enumerate(procs):
        if failed is None and p.poll() not in (None, 0):
          failed = i
          deadline = time.monotonic() + grace_s
          rest = f"; the others get {grace_s:.0f} s to stop" if running else ""
          print(f"launch: process {i} exited with status {p.returncode}{rest}",
                file=sys.stderr, flush=True)
      if deadline is not None and time.monotonic() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            print(f"launch: stopping process {i}", file=sys.stderr, flush=True)
            p.kill()
      if not running:
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGINT)
    for p in procs:
      p.wait()
  for t in relays:
    t.join(timeout=5)
  # A process ended by a signal reports -signal: exit as a shell would, 128 + signal.
  codes = [c if c >= 0 else 128 - c for c in (p.returncode for p in procs)]
  if failed is None:
    failed = next((i for i, c in enumerate(codes) if c), None)
  return 0 if failed is None else (codes[failed] or 1)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  ours, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  parser = argparse.ArgumentParser(prog="python -m affinity_jax.launch",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--grace_s", type=float, default=60.0,
                      help="after one process fails, seconds before the others are stopped")
  args = parser.parse_args(ours)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be at least 1")
  if not main_args:
    parser.error("give affinity_jax.main's arguments after --, e.g. "
                 "-- --config=configs/scenes.py:tiny --workdir=/tmp/mh")
  return launch(main_args, args.num_processes, args.devices_per_process, args.port,
                args.grace_s)


if __name__ == "__main__":
  sys.exit(main())
