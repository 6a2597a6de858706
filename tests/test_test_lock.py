"""requirements-test.lock: torch's CPU build, and the same pins as requirements.lock for
what both hold (pip, given both with --no-deps, refuses two pins of one package)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(name):
  with open(os.path.join(ROOT, name)) as f:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.M))


def test_test_lock_pins_torch_cpu_and_agrees_with_the_main_lock():
  main, test = _pins("requirements.lock"), _pins("requirements-test.lock")
  assert test["torch"].endswith("+cpu")   # PyPI's plain release is the CUDA build.
  assert "torch" not in main
  shared = sorted(set(main) & set(test))
  assert shared and {k: test[k] for k in shared} == {k: main[k] for k in shared}


def test_ci_and_readme_install_the_test_lock():
  for name in (".ci/run", "README.md"):
    with open(os.path.join(ROOT, name)) as f:
      assert "-r requirements.lock -r requirements-test.lock -e . --no-deps" in f.read(), name
