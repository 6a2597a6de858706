"""The device mesh, its axis name, shardings, batch placement and multi-host start-up.

Everything runs on one 1-D mesh over all devices with the axis `DATA_AXIS`: batches are
split along their first dimension, parameters and optimiser state are replicated. The
input pipeline, the training loop, inference and the stages all place their arrays
through this module. On a TPU pod slice or several GPU hosts,
`maybe_initialize_distributed` must run before anything else touches JAX so that
`jax.devices()` lists every host's devices; the other multi-host helpers (barriers,
gathers, the shared stop signal) are here too.
"""

import functools
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from affinity_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def jit_over_batch(fn, state, mesh: Mesh | None = None):
  """`jax.jit` of `fn(state, batch)` for inference, split over `mesh` when one is given.

  Args:
    fn: a pure function of (state, batch [B, ...]).
    state: the pytree `fn` takes first (e.g. a model's nnx state).
    mesh: optional mesh: `state` is replicated on it and the batch split over its
      `data` axis (B must then be a multiple of the mesh's size).

  Returns:
    (the jitted fn, `state` placed as it expects).
  """
  if mesh is None:
    return jax.jit(fn), state
  copy = replicated(mesh)
  return (jax.jit(fn, in_shardings=(copy, data_sharding(mesh))),
          jax.device_put(state, copy))


def pad_batch(x: np.ndarray, multiple: int) -> np.ndarray:
  """x with zeros appended along its first (batch) axis up to a multiple of `multiple`."""
  return np.pad(x, [(0, -len(x) % multiple)] + [(0, 0)] * (x.ndim - 1))


def maybe_initialize_distributed(config: Any) -> bool:
  """Calls `jax.distributed.initialize` when `config.distributed` asks for it.

  `config.distributed.coordinator_address` selects the mode: empty or missing means
  single process (nothing happens); `"auto"` lets JAX detect the cluster (TPU pod
  slices, SLURM, Open MPI); `"host:port"` uses it together with
  `num_processes` and `process_id`.

  Args:
    config: a ConfigDict (or anything with `.get`) that may hold `distributed`.

  Returns:
    True when `jax.distributed.initialize` was called.
  """
  dist = config.get("distributed") if hasattr(config, "get") else None
  address = (dist.get("coordinator_address") if dist is not None else "") or ""
  if not address:
    return False
  # Failure detection: how long the others wait for a process that stopped answering.
  timeout = dict(heartbeat_timeout_seconds=int(dist.get("heartbeat_timeout_s", 100)))
  if address == "auto":
    jax.distributed.initialize(**timeout)
    return True
  num_processes = dist.get("num_processes", -1)
  process_id = dist.get("process_id", -1)
  if num_processes is None or num_processes < 1 or process_id is None or process_id < 0:
    raise UserError(
        f"config.distributed.coordinator_address={address!r} needs "
        f"config.distributed.num_processes >= 1 and process_id >= 0 "
        f"(got {num_processes}, {process_id}); or use coordinator_address='auto'")
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num_processes, process_id=process_id,
      **timeout)
  return True


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing on a single host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> bool:
  """Whether `flag` is true on every process (each must call it, in the same order)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


@functools.lru_cache(maxsize=8)
def _max_of(mesh: Mesh):
  return jax.jit(jnp.max, out_shardings=replicated(mesh))


def max_over_processes(value: int, mesh: Mesh) -> jax.Array:
  """The largest of every process's `value`, dispatched without waiting (each must call it).

  Returns:
    A replicated int32 scalar; `np.asarray(x.addressable_data(0))` waits and reads it.
  """
  local = np.full((mesh.local_mesh.devices.size,), value, np.int32)
  return _max_of(mesh)(jax.make_array_from_process_local_data(data_sharding(mesh), local))


_STOP_KEY = "affinity_jax/stop"
_published = False  # Whether this process published its stop.


def publish_stop(signum: int) -> None:
  """Tells every process of the run that this one got stop signal `signum` (once)."""
  global _published
  if not _published:
    _published = True
    from jax._src import distributed
    try:
      distributed.global_state.client.key_value_set(_STOP_KEY, str(int(signum)))
    except Exception:  # noqa: BLE001 -- another process published first.
      pass


def published_stop() -> int:
  """The stop signal some process of the run published (`publish_stop`), or 0."""
  from jax._src import distributed
  try:
    return int(distributed.global_state.client.key_value_try_get(_STOP_KEY))
  except Exception:  # noqa: BLE001 -- not found: nobody did.
    return 0


def wait_for_all(name: str, timeout_s: float) -> bool:
  """Waits up to `timeout_s` until every process reaches barrier `name` (outside any
  device collective, through the coordination service); whether all did."""
  if jax.process_count() == 1:
    return True
  from jax._src import distributed
  try:
    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
    return True
  except Exception:  # noqa: BLE001 -- a timeout or a process already gone.
    return False


def gather_json(value: Any) -> list:
  """Every process's JSON-serialisable `value`, in process order (each must call it)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray(len(data), np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)  # [processes, longest]
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, sizes)]


def replicated_key(seed: int, mesh: Mesh) -> jax.Array:
  """`jax.random.key(seed)` replicated on `mesh` (made on the devices, so also on a
  mesh spanning several hosts, where `device_put` of a local array cannot go)."""
  return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated(mesh))()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this host's part of a batch into global arrays split on `data`.

  Args:
    batch: dict of host-local NumPy arrays, each `[B_local, ...]`; the global batch
      is the concatenation over hosts in process order.
    mesh: the mesh the batch is split over.

  Returns:
    dict of `jax.Array`s `[B_local * num_processes, ...]` sharded on `data`.
  """
  sharding = data_sharding(mesh)
  local_devices = mesh.local_mesh.devices.size
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise UserError(
          f"batch entry {name!r} has shape {value.shape}: its first dimension must be a "
          f"multiple of the {local_devices} local devices")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
