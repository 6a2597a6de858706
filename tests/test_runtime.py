"""The command-line entry points restart once with glibc's huge-page tunable."""

import os
import subprocess
import sys

from affinity_jax import runtime


def test_tuned_environ_appends_and_is_not_wanted_twice():
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  tuned = runtime.tuned_environ(env)
  assert tuned["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + runtime.TUNABLE
  assert not runtime.wanted(tuned)
  assert not runtime.wanted({runtime.OPT_OUT: "1"})


def test_entry_point_restarts_with_the_tunable():
  # A child that calls restart_with_huge_pages and prints what it ends up with.
  code = ("from affinity_jax import runtime; runtime.restart_with_huge_pages(); "
          "import os; print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  want = runtime.TUNABLE if runtime.wanted(env) else ""
  assert out.strip() == f"TUNABLES={want}"
