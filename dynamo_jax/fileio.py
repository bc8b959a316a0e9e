"""Atomic directories and streaming safetensors I/O, one tensor at a time.

Reading uses positioned reads instead of a memory map, so converting a large
checkpoint holds one tensor in host memory, not the mapped file besides the
converted copy. The header is validated before any tensor is read; each
tensor's values are checked (floating point, finite) by `check_tensor` as
the converters stream it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
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
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                np.dtype(np.float32), np.dtype(np.float64))
# Elements per np.isfinite pass: bounds its boolean temporary at 16 MiB
# (a whole pythia-12b embedding at once would need 260 MB).
_FINITE_CHUNK = 1 << 24


_HOST = socket.gethostname().replace("/", "_")


def temp_prefix(name: str) -> str:
  """The name prefix of this process's temporary siblings of `name`.

  It records the owner (pid and host), so a later run can tell a leftover of
  a killed process (`remove_stale`) from the work of one still running.
  """
  return f".{name}.tmp-{os.getpid()}@{_HOST}."


def _owner_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def remove_stale(parent: str, name: str) -> list[str]:
  """Removes temporary siblings of `name` in `parent` whose owner process, on
  this host, has died (killed mid-write); returns what was removed. Those of
  live processes and of other hosts (a shared file system) are kept."""
  lead = f".{name}.tmp-"
  removed = []
  try:
    entries = os.listdir(parent)
  except OSError:
    return removed
  for entry in entries:
    if not entry.startswith(lead):
      continue
    pid, _, rest = entry[len(lead):].partition("@")
    host = rest.rpartition(".")[0]
    if not pid.isdigit() or host != _HOST or _owner_alive(int(pid)):
      continue
    path = os.path.join(parent, entry)
    _remove(path)
    removed.append(path)
  return removed


def _remove(path: str) -> None:
  """Removes a temporary entry: a directory tree or a file (or link)."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.remove(path)


def _own_temp(make: Callable, parent: str, prefix: str):
  """make(): tempfile.mkstemp or mkdtemp with `prefix` (this process's,
  `temp_prefix`) in `parent`. A Ctrl-C or SIGTERM can land inside it after
  it made the entry and before it returned the name, where no caller could
  remove it; then what is new under this process's prefix is removed before
  the interrupt goes on."""
  def own() -> set:
    try:
      return {e for e in os.listdir(parent) if e.startswith(prefix)}
    except OSError:
      return set()

  before = own()
  try:
    return make()
  except BaseException:
    for entry in own() - before:
      _remove(os.path.join(parent, entry))
    raise


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
  """`write(binary file)` into a temporary sibling of `path`, flushed to
  disk, then renamed onto it: readers see the old file or the whole new
  one, never a part. The file gets the umask's permissions; a sibling left
  by a killed writer is removed first."""
  path = os.path.abspath(os.fspath(path))
  directory, name = os.path.split(path)
  remove_stale(directory, name)
  prefix = temp_prefix(name)
  fd, tmp = _own_temp(
      lambda: tempfile.mkstemp(prefix=prefix, dir=directory), directory,
      prefix)
  try:
    with os.fdopen(fd, "wb") as fh:
      write(fh)
      fh.flush()
      os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """`atomic_write` of UTF-8 text."""
  atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary sibling of `out_dir`, renamed onto it on success.

  On any exception (SIGTERM too, when the CLI turns it into SystemExit) the
  temporary directory is removed and `out_dir` is left as it was; what a
  `kill -9` leaves behind is removed by the next `atomic_dir` of the same
  name. An existing non-empty `out_dir` is refused, never overwritten. The
  result gets the permissions the umask gives a new directory (mkdtemp's
  are 0700).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                  or os.listdir(out_dir)):
    raise CheckpointError(f"output {out_dir} already exists and is not empty; "
                          "choose a new path or remove it first.")
  parent, name = os.path.split(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent, name)
    prefix = temp_prefix(name)
    tmp = _own_temp(lambda: tempfile.mkdtemp(prefix=prefix, dir=parent),
                    parent, prefix)
  except OSError as e:
    raise CheckpointError(f"cannot write {out_dir}: {e.strerror or e} "
                          f"({e.filename or parent}); choose a writable "
                          "location.") from None
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_output(out_dir: str | os.PathLike) -> Iterator[str]:
  """`atomic_dir`, with OS errors while writing (a read-only location, a
  full disk) raised as CheckpointError naming `out_dir`."""
  try:
    with atomic_dir(out_dir) as tmp:
      yield tmp
  except OSError as e:
    where = f" ({e.filename})" if e.filename else ""
    raise CheckpointError(
        f"cannot write {os.fspath(out_dir)}: {e.strerror or e}{where}; choose "
        "a writable location with enough free space.") from None


def check_tensor(array: np.ndarray, what: str, fix: str) -> None:
  """Refuses `array` unless it is floating point and finite.

  `what` names the tensor and where it is ("tensor X in FILE"); `fix` says
  what to do about it. Costs one np.isfinite pass over the values.
  """
  if array.dtype not in FLOAT_DTYPES:
    raise CheckpointError(
        f"{what} has dtype {array.dtype.name}, but parameters are floating "
        f"point (float16, bfloat16, float32 or float64); {fix}")
  flat = array.reshape(-1)
  for start in range(0, flat.size, _FINITE_CHUNK):
    if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
      raise CheckpointError(f"{what} holds non-finite values (NaN or Inf); "
                            f"{fix}")


def checked_cast(array: np.ndarray, dtype, what: str, fix: str) -> np.ndarray:
  """`check_tensor(array)`, then `array` in `dtype`, checked again when the
  cast narrows it (float32 values can overflow float16)."""
  check_tensor(array, what, fix)
  with np.errstate(over="ignore"):  # reported below, naming the tensor
    cast = array.astype(dtype, copy=False)
  if cast.dtype.itemsize < array.dtype.itemsize:
    check_tensor(cast, f"{what}, cast to {cast.dtype.name},",
                 "its values overflow that dtype: load it as float32.")
  return cast


def tensor_sha256(array: np.ndarray) -> str:
  """Hex sha256 of a tensor's bytes as safetensors stores them (C order)."""
  return hashlib.sha256(
      np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


class SafetensorsReader:
  """Validated random access to the tensors of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: "
                            "re-download or re-convert it.")
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
    try:
      with open(self.path, "rb") as f:
        f.seek(self._base + start)
        complete = f.readinto(buf) == nbytes
    except OSError as e:
      raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: "
                            f"{e.strerror or e}.") from None
    if not complete:
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
