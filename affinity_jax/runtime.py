"""Process set-up that has to happen before the first allocation.

XLA on CPU allocates each executable's temporaries afresh on every call; blocks this
large come from `mmap`, so the kernel zero-fills every 4 KB page on first touch. A
Lite0 train step at 192 px touched ~2 GB this way (millions of minor page faults a
run, a third of its CPU time in the kernel). glibc's `hugetlb` tunable makes malloc
ask for transparent huge pages, 512 times fewer faults. Tunables are read when a
process starts, so the command-line entry points restart themselves once with it set.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "AFFINITY_JAX_NO_REEXEC"


def wanted(environ=os.environ) -> bool:
  """Whether this process should restart with `TUNABLE` (glibc Linux, not yet set)."""
  return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
          and "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "")
          and not environ.get(OPT_OUT))


def tuned_environ(environ=os.environ) -> dict:
  """`environ` with `TUNABLE` appended to GLIBC_TUNABLES."""
  current = environ.get("GLIBC_TUNABLES", "")
  return dict(environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)


def restart_with_huge_pages() -> None:
  """Re-executes the current command with `TUNABLE` set; returns if nothing to do.

  Call first thing in a `__main__` block. Set AFFINITY_JAX_NO_REEXEC=1 to skip it.
  """
  if wanted():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, tuned_environ())
