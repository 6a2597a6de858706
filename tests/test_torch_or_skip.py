"""Where torch is missing, the torch tests skip, except under AFFINITY_JAX_REQUIRE_TORCH=1
(set by .ci/run), where they fail."""

import sys

import pytest

import torch_or_skip


@pytest.fixture
def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError.


def test_missing_torch_skips_by_default(no_torch, monkeypatch):
  monkeypatch.delenv(torch_or_skip.REQUIRE, raising=False)
  with pytest.raises(pytest.skip.Exception, match="requirements-test.lock"):
    torch_or_skip.import_torch()


def test_missing_torch_fails_where_required(no_torch, monkeypatch):
  monkeypatch.setenv(torch_or_skip.REQUIRE, "1")
  with pytest.raises(pytest.fail.Exception, match="AFFINITY_JAX_REQUIRE_TORCH=1"):
    torch_or_skip.import_torch()
