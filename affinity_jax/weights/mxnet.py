"""MXNet `.params` files (the NDArray-list binary format of `mx.nd.save`), no mxnet needed.

Layout (little endian): uint64 magic 0x112, uint64 reserved, uint64 count, then
`count` arrays, then uint64 count and `count` names (uint64 length + bytes).
Each array is one of
- V1/V2/V3: uint32 magic (0xF993FAC8 / ..C9 / ..CA); V2/V3 add int32 storage
  type (0 = dense); then uint32 ndim and int64 dims;
- legacy: uint32 ndim and uint32 dims;
followed (when ndim > 0) by int32 device type, int32 device id, int32 dtype
flag and the raw data. ademxapp's ResNet-38 names its arrays `arg:<name>`
(weights) and `aux:<name>` (BatchNorm moving statistics).
"""

import struct

import numpy as np

from affinity_jax.errors import UserError

LIST_MAGIC = 0x112
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
          6: np.int64}


class _Reader:

  def __init__(self, path: str, data: bytes):
    self.path, self.data, self.pos = path, data, 0

  def take(self, fmt: str):
    size = struct.calcsize(fmt)
    if self.pos + size > len(self.data):
      raise UserError(f"{self.path}: truncated MXNet .params file")
    out = struct.unpack_from(fmt, self.data, self.pos)
    self.pos += size
    return out

  def array(self) -> np.ndarray:
    (head,) = self.take("<I")
    if head in (V1, V2, V3):
      if head != V1:
        (stype,) = self.take("<i")
        if stype != 0:
          raise UserError(f"{self.path}: sparse MXNet arrays are not supported")
      (ndim,) = self.take("<I")
      shape = self.take(f"<{ndim}q")
    else:
      ndim = head
      if ndim > 32:
        raise UserError(f"{self.path}: not an MXNet .params file (bad array header)")
      shape = self.take(f"<{ndim}I")
    if ndim == 0:
      return np.zeros((0,), np.float32)
    _dev_type, _dev_id, flag = self.take("<iii")
    if flag not in DTYPES:
      raise UserError(f"{self.path}: unknown MXNet dtype flag {flag}")
    dtype = np.dtype(DTYPES[flag])
    count = int(np.prod(shape))
    end = self.pos + count * dtype.itemsize
    if end > len(self.data):
      raise UserError(f"{self.path}: truncated MXNet .params file")
    arr = np.frombuffer(self.data, dtype, count, self.pos).reshape(shape).copy()
    self.pos = end
    return arr


def load_params(path: str) -> dict[str, np.ndarray]:
  """Reads an MXNet `.params` file as {name: array} (names keep `arg:`/`aux:`)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
  r = _Reader(path, data)
  magic, _ = r.take("<QQ")
  if magic != LIST_MAGIC:
    raise UserError(f"{path}: not an MXNet .params file (bad magic number)")
  (n,) = r.take("<Q")
  arrays = [r.array() for _ in range(n)]
  (n_names,) = r.take("<Q")
  names = []
  for _ in range(n_names):
    (length,) = r.take("<Q")
    names.append(r.take(f"<{length}s")[0].decode())
  if n_names != n:
    raise UserError(f"{path}: {n} arrays but {n_names} names")
  return dict(zip(names, arrays))
