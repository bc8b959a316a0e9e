"""Joining a multi-process (multi-host) JAX run, and checking it is whole.

One Python process per host (a TPU VM worker, a GPU machine), all started
with the same command but their own process id; JAX's runtime connects them
through a coordinator (process 0's HOST:PORT) and the mesh then spans every
process's devices. On CPU the cross-process collectives go through gloo.

  initialize()                                   # TPU VM / SLURM: auto-detect
  initialize("10.0.0.2:8476", num_processes=2, process_id=1)
  check_shared_dir(workdir)                      # after initialize, on all

A subcommand that can run this way takes the flags from `add_arguments`
and joins with `initialize_from_args(args)`; `allgather`, `barrier` and
`check_all_ok` are its collectives on host (numpy) data.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import socket
import sys
import time

import jax
import numpy as np

from dynamo_jax.errors import DynamoError

# A coordinator that does not answer within this many seconds is an error
# (jax's own default, 300 s, is kept: TPU pod workers can start minutes
# apart).
DEFAULT_TIMEOUT_S = 300

_MARKER = ".dynamo_shared_check"


class DistributedError(DynamoError):
  """The processes of a multi-process run cannot form one run."""


def add_arguments(parser) -> None:
  """Adds --distributed, --coordinator, --num-processes, --process-id and
  --coordinator-timeout to an argparse parser."""
  parser.add_argument(
      "--distributed", action="store_true",
      help="one process per host (TPU pod slices, multi-host GPU): join the "
      "others; alone, JAX detects the cluster (TPU VM, SLURM), else give the "
      "next three flags")
  parser.add_argument("--coordinator", metavar="HOST:PORT",
                      help="process 0's address, the same on every process "
                      "(implies --distributed)")
  parser.add_argument("--num-processes", type=int, metavar="N",
                      help="number of processes (hosts)")
  parser.add_argument("--process-id", type=int, metavar="I",
                      help="this process, 0..N-1")
  parser.add_argument("--coordinator-timeout", type=int, metavar="SECONDS",
                      default=DEFAULT_TIMEOUT_S, help="how long to wait for "
                      f"all processes to join (default {DEFAULT_TIMEOUT_S})")


def initialize_from_args(args) -> bool:
  """`initialize` from `add_arguments`' flags when any is given; returns
  whether this process joined a multi-process run."""
  flags = (args.coordinator, args.num_processes, args.process_id)
  if not (args.distributed or any(f is not None for f in flags)):
    return False
  initialize(*flags, timeout_s=args.coordinator_timeout)
  return True


@contextlib.contextmanager
def _stdout_to_stderr():
  """Gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks" to the
  process's stdout when its first collective connects; sent to stderr, it
  cannot break a command's --json output."""
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    os.dup2(2, 1)
    yield
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def allgather(x: np.ndarray) -> np.ndarray:
  """[P, *x.shape]: every process's `x` (same shape and dtype on all), in
  process order; `x[None]` for one process."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  with _stdout_to_stderr():
    return np.asarray(multihost_utils.process_allgather(x))


def barrier(name: str) -> None:
  """Waits until every process has reached `barrier(name)`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    with _stdout_to_stderr():
      multihost_utils.sync_global_devices(f"dynamo_jax:{name}")


def check_all_ok(ok: bool, what: str) -> None:
  """A barrier that also tells every process whether the others succeeded
  at `what`: raises DistributedError on the processes that did, naming the
  ones that did not (which raise their own error)."""
  failed = [p for p, o in enumerate(allgather(np.asarray(ok)).reshape(-1))
            if not o]
  if ok and failed:
    raise DistributedError(
        f"process{'es' if len(failed) > 1 else ''} "
        f"{', '.join(map(str, failed))} failed while {what}: see "
        f"{'their' if len(failed) > 1 else 'its'} own error.")


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Joins the run: `jax.distributed.initialize`, then checks its devices.

  With no arguments JAX detects the cluster (Cloud TPU VM, SLURM, ...); else
  all three are needed. Must run before anything touches a device.

  Raises:
    DistributedError: partial or out-of-range flags, a coordinator not
      reached within `timeout_s`, no cluster detected, or processes with
      unequal device counts.
  """
  given = {"--coordinator": coordinator, "--num-processes": num_processes,
           "--process-id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing and len(missing) < len(given):
    raise DistributedError(
        f"{', '.join(k for k in given if k not in missing)} given without "
        f"{', '.join(missing)}: give all three (the same --coordinator and "
        "--num-processes on every process, --process-id 0..N-1), or none to "
        "let JAX detect the cluster (TPU VM, SLURM).")
  explicit = not missing
  if explicit:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"--coordinator {coordinator!r} is not HOST:PORT "
                             "(e.g. 10.0.0.2:8476, process 0's address).")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(
          f"--process-id {process_id} is not in 0..{num_processes - 1} "
          f"(--num-processes {num_processes}).")
  # CPU collectives across processes (gloo is also jax 0.10's default; set
  # so that a changed default cannot leave a CPU run without them).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (f"the coordinator at {coordinator} (process {process_id} of "
           f"{num_processes})" if explicit else "the auto-detected coordinator")
  if explicit:
    # jax's client aborts the process (no Python exception) when it cannot
    # reach the coordinator or the others never join; a plain TCP roll call
    # on the same port first turns those into errors that say who is missing.
    _roll_call(host, int(port), num_processes, process_id, timeout_s)
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address=coordinator,
                                 num_processes=num_processes,
                                 process_id=process_id,
                                 initialization_timeout=timeout_s)
    else:
      jax.distributed.initialize(initialization_timeout=timeout_s)
  except ValueError as e:
    if explicit:
      raise DistributedError(f"jax.distributed.initialize: {e}") from None
    raise DistributedError(
        f"--distributed found no cluster to join ({e}): outside a TPU VM or "
        "SLURM job give --coordinator HOST:PORT --num-processes N "
        "--process-id I.") from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    # jaxlib's XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...).
    reason = " ".join(str(e).split())[:200]
    raise DistributedError(
        f"could not join {where} within {timeout_s} s ({reason}). Check that "
        "process 0 is running with the same --coordinator and "
        "--num-processes, that every process was started (ids 0..N-1 once "
        "each), that HOST resolves from this machine and its PORT is open "
        "(firewall), or raise --coordinator-timeout.") from None
  check_devices(num_processes)


def check_devices(num_processes: int | None = None) -> None:
  """Every process is present and has as many devices as the others."""
  per_process = collections.Counter(d.process_index for d in jax.devices())
  count = jax.process_count()
  if num_processes is not None and count != num_processes:
    raise DistributedError(f"--num-processes {num_processes}, but JAX counts "
                           f"{count} processes.")
  missing = [p for p in range(count) if p not in per_process]
  if missing:
    raise DistributedError(f"processes {missing} of {count} have no devices.")
  if len(set(per_process.values())) > 1:
    listed = ", ".join(f"process {p}: {n}"
                       for p, n in sorted(per_process.items()))
    raise DistributedError(
        f"the processes have unequal device counts ({listed}): every process "
        "must see as many devices (check XLA_FLAGS, CUDA_VISIBLE_DEVICES or "
        "TPU_VISIBLE_CHIPS on each host).")


def check_shared_dir(directory: str) -> None:
  """Checks that every process sees the same `directory` (a shared file
  system): process 0 writes a random token there, the others read it back.
  Orbax writes one checkpoint from all processes, so a directory local to
  each host would give checkpoints no process can restore. A no-op for one
  process.

  Raises:
    DistributedError: naming the processes that do not see process 0's file.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, _MARKER)
  token = np.frombuffer(secrets.token_bytes(16), np.uint8)
  token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  if jax.process_index() == 0:
    with open(path, "w") as fh:
      fh.write(token.tobytes().hex())
  multihost_utils.sync_global_devices("dynamo_jax:shared_dir_written")
  try:
    with open(path) as fh:
      ok = fh.read().strip() == token.tobytes().hex()
  except OSError:
    ok = False
  seen = np.asarray(multihost_utils.process_allgather(np.asarray(ok)))
  multihost_utils.sync_global_devices("dynamo_jax:shared_dir_read")
  if jax.process_index() == 0:
    os.remove(path)
  blind = [p for p, s in enumerate(seen.reshape(-1)) if not s]
  if blind:
    raise DistributedError(
        f"process{'es' if len(blind) > 1 else ''} "
        f"{', '.join(map(str, blind))} cannot see the file process 0 wrote in "
        f"{directory}: the workdir must be one directory shared by every "
        "process (NFS, Filestore, a gcsfuse mount; the same path on each "
        "host).")


def _roll_call(host: str, port: int, num_processes: int, process_id: int,
               timeout_s: float) -> None:
  """Process 0 listens on the coordinator's port until the other N-1
  processes have reported (each its id and N), then answers every one "go",
  or the reason the run cannot start; the port is then free for jax."""
  if num_processes == 1:
    return
  deadline = time.monotonic() + timeout_s
  address = f"{host}:{port}"
  if process_id != 0:
    _report(host, port, num_processes, process_id, deadline, address,
            timeout_s)
    return
  listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind(("", port))
  except OSError as e:
    listener.close()
    raise DistributedError(f"process 0 cannot listen on port {port} of "
                           f"--coordinator {address} ({e.strerror}): is another"
                           " run using it? Pick a free port.") from None
  listener.listen(num_processes)
  joined, problems = {}, []
  try:
    while len(joined) < num_processes - 1 and not problems:
      left = deadline - time.monotonic()
      if left <= 0:
        absent = sorted(set(range(1, num_processes)) - set(joined))
        problems.append(
            f"processes {absent} did not join the coordinator at {address} "
            f"within {timeout_s:g} s: start them with --coordinator {address}"
            f" --num-processes {num_processes} --process-id I, check that "
            "they can reach this host and port (firewall), or raise "
            "--coordinator-timeout")
        break
      listener.settimeout(min(left, 1.0))
      try:
        conn, _ = listener.accept()
      except socket.timeout:
        continue
      conn.settimeout(max(deadline - time.monotonic(), 1.0))
      try:
        pid, count = (int(x) for x in _read_line(conn).split())
      except (OSError, ValueError):
        conn.close()  # not one of ours (a port scan, a stale client)
        continue
      if count != num_processes:
        problems.append(f"process {pid} was started with --num-processes "
                        f"{count}, process 0 with {num_processes}")
      elif pid in joined or not 0 < pid < num_processes:
        problems.append(f"two processes were started with --process-id {pid}"
                        if pid in joined or pid == 0 else
                        f"--process-id {pid} is not in 0..{num_processes - 1}")
      joined.setdefault(pid, conn)
      if joined[pid] is not conn:
        _send(conn, "error " + problems[-1])
        conn.close()
    answer = "error " + problems[0] if problems else "go"
    for conn in joined.values():
      _send(conn, answer)
    for conn in joined.values():  # they close first: no TIME_WAIT on the port
      try:
        conn.settimeout(10)
        conn.recv(1)
      except OSError:
        pass
      conn.close()
  finally:
    listener.close()
  if problems:
    raise DistributedError(problems[0] + ".")


def _report(host, port, num_processes, process_id, deadline, address,
            deadline_s):
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise DistributedError(
          f"process {process_id} could not reach the coordinator at {address} "
          f"within {deadline_s:g} s: check that process 0 runs there "
          "with the same --coordinator and --num-processes, that the host "
          "name resolves from this machine and the port is open (firewall), "
          "or raise --coordinator-timeout.")
    try:
      conn = socket.create_connection((host, port), timeout=min(left, 5.0))
      break
    except OSError:
      time.sleep(min(0.25, max(left, 0)))
  with conn:
    conn.settimeout(max(deadline - time.monotonic(), 0) + 30)
    _send(conn, f"{process_id} {num_processes}")
    try:
      answer = _read_line(conn)
    except OSError:
      answer = ""
  if answer != "go":
    reason = (answer[len("error "):] if answer.startswith("error ") else
              f"process 0 at {address} did not answer")
    raise DistributedError(reason + ".")


def _send(conn: socket.socket, line: str) -> None:
  try:
    conn.sendall(line.encode() + b"\n")
  except OSError:
    pass


def _read_line(conn: socket.socket) -> str:
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(4096)
    if not chunk:
      break
    data += chunk
  return data.decode(errors="replace").strip()
