"""`torch = torch_or_skip.import_torch()`: torch for the parity tests, or a skip.

torch is a test-only requirement (requirements-test.lock). Where it is missing the torch
tests are skipped, except where `AFFINITY_JAX_REQUIRE_TORCH=1` is set (`.ci/run` sets it):
there a missing torch fails the run, so CI cannot pass without the parity checks.
"""

import os

import pytest

REQUIRE = "AFFINITY_JAX_REQUIRE_TORCH"


def import_torch():
  if os.environ.get(REQUIRE) == "1":
    try:
      import torch
    except ImportError as e:
      pytest.fail(f"{REQUIRE}=1 but torch does not import ({e}); install requirements-test.lock "
                  "(docs/install.md)", pytrace=False)
    return torch
  return pytest.importorskip("torch", reason="torch is not installed (requirements-test.lock)")
