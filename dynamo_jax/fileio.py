"""Atomic directories and streaming safetensors I/O, one tensor at a time.

Reading uses positioned reads instead of a memory map, so converting a large
checkpoint holds one tensor in host memory, not the mapped file besides the
converted copy. The header is validated before any tensor is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from dynamo_jax.errors import CheckpointError

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary sibling of `out_dir`, renamed onto it on success.

  On any exception the temporary directory is removed and `out_dir` is left
  as it was. An existing non-empty `out_dir` is refused, never overwritten.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                  or os.listdir(out_dir)):
    raise CheckpointError(f"output {out_dir} already exists and is not empty; "
                          "choose a new path or remove it first.")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


class SafetensorsReader:
  """Validated random access to the tensors of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
          raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._base = 8 + n
    self._entries = {}
    data_len = size - self._base
    for name, info in header.items():
      try:
        dtype = _ST_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"corrupt safetensors file {path}: bad header "
                              f"entry for {name!r}: {info!r}") from None
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if not 0 <= start <= end <= data_len or end - start != nbytes:
        raise CheckpointError(
            f"corrupt safetensors file {path}: tensor {name!r} claims bytes "
            f"[{start}, {end}) for shape {shape} {dtype} in a data section of "
            f"{data_len} bytes (truncated or damaged file?).")
      self._entries[name] = (dtype, shape, start)

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def get(self, name: str) -> np.ndarray:
    dtype, shape, start = self._entries[name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = bytearray(nbytes)
    with open(self.path, "rb") as f:
      f.seek(self._base + start)
      if f.readinto(buf) != nbytes:
        raise CheckpointError(f"corrupt safetensors file {self.path}: tensor "
                              f"{name!r} is truncated.")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def write_safetensors(path: str, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None,
                      progress: Callable[[str], None] | None = None) -> int:
  """Streams tensors into a safetensors file; returns bytes of tensor data.

  `specs` fixes the names, order, shapes and dtypes up front (the header comes
  first), so `tensors` may be a generator producing one array at a time.
  """
  header, offset = {}, 0
  for name, (shape, dtype) in specs.items():
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
  produced = iter(tensors)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for want_name, (shape, dtype) in specs.items():
      item = next(produced, None)
      if item is None:
        raise ValueError(f"tensor stream ended before {want_name}")
      name, array = item
      array = np.ascontiguousarray(array)
      if (name, tuple(array.shape), array.dtype) != (want_name, tuple(shape),
                                                     np.dtype(dtype)):
        raise ValueError(f"tensor {name} {array.shape} {array.dtype} does not "
                         f"match spec {want_name} {shape} {dtype}")
      f.write(array.reshape(-1).view(np.uint8).data)
      if progress:
        progress(name)
    if next(produced, None) is not None:  # also lets generators finish
      raise ValueError("more tensors than specs")
  return offset
