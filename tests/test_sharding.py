"""Mesh, shardings, batch placement and the distributed switch."""

import jax
import ml_collections
import numpy as np
import pytest

from affinity_jax import sharding
from affinity_jax.errors import UserError


def test_mesh_and_shard_batch():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 8
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.shard_batch({"x": x, "y": np.arange(16)}, mesh)
  assert batch["x"].sharding == sharding.data_sharding(mesh)
  assert [s.data.shape for s in batch["x"].addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(np.asarray(batch["x"]), x)
  assert sharding.replicated(mesh).is_fully_replicated
  with pytest.raises(UserError, match="'x'"):
    sharding.shard_batch({"x": x[:6]}, mesh)


def test_distributed_is_off_unless_configured(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert not sharding.maybe_initialize_distributed(ml_collections.ConfigDict({}))
  off = ml_collections.ConfigDict({"distributed": {"coordinator_address": ""}})
  assert not sharding.maybe_initialize_distributed(off)
  on = ml_collections.ConfigDict({"distributed": {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}})
  assert sharding.maybe_initialize_distributed(on)
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                        heartbeat_timeout_seconds=100)]
  on.distributed.num_processes = -1
  with pytest.raises(UserError, match="num_processes"):
    sharding.maybe_initialize_distributed(on)
  auto = ml_collections.ConfigDict({"distributed": {"coordinator_address": "auto"}})
  auto.distributed.heartbeat_timeout_s = 7
  assert sharding.maybe_initialize_distributed(auto)
  assert calls[-1] == dict(heartbeat_timeout_seconds=7)
