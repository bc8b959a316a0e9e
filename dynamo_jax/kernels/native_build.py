"""Building and registering the project's native CPU kernels (XLA FFI).

  build(source) -> Path: `source` (a .cc file of this package) compiled into
      a shared library for this CPU, cached.
  register(source, targets): builds it and registers its handlers with
      XLA:CPU, once per process ({custom-call target: exported symbol}).
  check_backend(what): refuses a process that computes on a GPU or TPU.

Each kernel is compiled on first use from the package's own source with the
machine's C++ compiler ($CXX, else g++), for this CPU (-march=native), into
$DYNAMO_CACHE/native (the project's cache, default ~/.cache/dynamo_jax),
keyed by the source, the flags, the CPU and jax's version; a cached build is
used without a compiler. No compiler, a failed build or a non-CPU backend is
an error that says so; nothing falls back to XLA. The kernels are chosen
explicitly (cpu_matmul.pack_params, cooc.device_table(lookup="native")).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

import jax

from dynamo_jax import fileio
from dynamo_jax.errors import DynamoError

_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17",
          "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_registered: set[str] = set()


class NativeKernelError(DynamoError):
  """A native CPU kernel cannot be built or used here."""


def cache_dir() -> Path:
  """$DYNAMO_CACHE/native (default ~/.cache/dynamo_jax/native)."""
  from dynamo_jax.data import corpus  # pylint: disable=import-outside-toplevel
  return Path(corpus.cache_dir()) / "native"


# /proc/cpuinfo lines naming the CPU and its features (x86: model name,
# flags; Arm: implementer, part, features): -march=native builds for them.
_CPU_LINES = ("model name", "flags", "Features", "CPU implementer",
              "CPU architecture", "CPU part")


def _cpu_id() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      lines = [l for l in fh if l.startswith(_CPU_LINES)]
  except OSError:
    lines = []
  return "".join(sorted(set(lines))) or (platform.processor()
                                         + platform.machine())


def _compiler(what: str) -> str:
  cxx = os.environ.get("CXX") or "g++"
  path = shutil.which(cxx)
  if path is None:
    raise NativeKernelError(
        f"the {what} is compiled on first use with a C++ compiler, and "
        f"{cxx!r} was not found; install one (Debian/Ubuntu: apt install "
        "g++) or set CXX, or run without it (the default XLA path).")
  return path


def build(source_name: str, what: str) -> Path:
  """The compiled library of kernels/`source_name` (built now if not in the
  cache); `what` names the kernel in errors."""
  source = resources.files("dynamo_jax.kernels").joinpath(source_name)
  code = source.read_bytes()
  key = hashlib.sha256("\0".join(
      [code.decode(), " ".join(_FLAGS), _cpu_id(), jax.__version__,
       platform.machine()]).encode()).hexdigest()[:16]
  out = cache_dir() / f"{Path(source_name).stem}-{key}.so"
  if out.exists():
    return out
  cxx = _compiler(what)
  include = jax.ffi.include_dir()
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise NativeKernelError(
        f"cannot create the kernel cache {out.parent} ({e.strerror}); set "
        "DYNAMO_CACHE to a writable directory.") from None
  fileio.remove_stale(str(out.parent), out.name)
  tmp = out.parent / f"{fileio.temp_prefix(out.name)}so"
  with resources.as_file(source) as src:
    try:
      done = subprocess.run([cxx, *_FLAGS, f"-I{include}", str(src), "-o",
                             str(tmp)], capture_output=True, text=True,
                            timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      raise NativeKernelError(f"running the C++ compiler {cxx} failed ({e})"
                              "; fix it or set CXX to another one.") from None
  if done.returncode:
    tmp.unlink(missing_ok=True)
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    raise NativeKernelError(
        f"compiling the {what} ({source}) with {cxx} failed: {tail}")
  os.replace(tmp, out)  # atomic: a reader sees no library or the whole one
  return out


def register(source_name: str, targets: dict, what: str) -> None:
  """Builds kernels/`source_name` (once per machine) and registers each
  {target: symbol} with XLA:CPU (once per process)."""
  with _lock:
    if source_name in _registered:
      return
    path = build(source_name, what)
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
      raise NativeKernelError(
          f"the {what} {path} does not load ({e}); delete it to rebuild "
          "it.") from None
    for target, symbol in targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(
          getattr(lib, symbol)), platform="cpu")
    _registered.add(source_name)


def check_backend(what: str, instead: str) -> None:
  """Refuses a process whose default backend is not the CPU."""
  backend = jax.default_backend()
  if backend != "cpu":
    raise NativeKernelError(
        f"the {what} is a CPU kernel, and this process computes on "
        f"{backend!r}; {instead}")
