"""`python -m dynamo_jax train` stopped at random moments, then re-run with the
same command: kill -9 (anything may be half-written), and SIGINT / SIGTERM
(a clean stop with one line). The finished run equals an uninterrupted one
bit for bit (same CPU, same XLA program, same batches), and nothing temporary
survives the re-run.

Runs are tiny-test cut to 20 steps with a checkpoint every 4, so a kill often
lands in a save. The file starts 11 train processes; they share a persistent
XLA compilation cache, which halves each one's CPU time (the cached program is
the same program: metrics agree bit for bit with and without it)."""

import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dynamo_jax.training.metrics import read_metrics
from tests.test_train_loop import _cli, _overrides, corpus  # pylint: disable=unused-import

STEPS, CKPT_EVERY = 20, 4
# loop.py waits for an async save this many steps after dispatching it.
MAX_IN_FLIGHT = max(1, CKPT_EVERY // 10)


def _args(corpus):  # pylint: disable=redefined-outer-name
  return _overrides(corpus, steps=STEPS, ckpt_every=CKPT_EVERY,
                    keep_checkpoints=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return {**os.environ,
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def reference(corpus, env, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """The uninterrupted run. It fills the compilation cache before any run is
  killed (entries are written once, never rewritten)."""
  workdir = tmp_path_factory.mktemp("reference")
  subprocess.run(_cli(workdir, _args(corpus)), check=True, capture_output=True,
                 env=env)
  return workdir


def _logged_step(workdir) -> int:
  """The last step in metrics.jsonl, ignoring a line still being written."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
      lines = [l for l in fh.read().split("\n")[:-1] if l]
  except FileNotFoundError:
    return 0
  return json.loads(lines[-1])["step"] if lines else 0


def _run_until(workdir, args, env, step, delay):  # pylint: disable=redefined-outer-name
  """Starts a run, waits until it has logged `step`, then `delay` seconds."""
  proc = subprocess.Popen(_cli(workdir, args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if _logged_step(workdir) >= step:
      break
    time.sleep(0.01)
  logged = _logged_step(workdir)
  time.sleep(delay)
  return proc, logged


def _finished_steps(workdir) -> list[int]:
  """Steps whose save finished: orbax renames a step's temporary directory
  to the bare step number when the save is complete."""
  ckpts = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


def _leftovers(workdir) -> list[str]:
  return [os.path.join(root, name)
          for root, dirs, files in os.walk(workdir)
          for name in dirs + files if "tmp" in name.lower()]


def _params(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data", "meta"))
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]
  finally:
    mngr.close()


def _strip(records):
  return [{k: v for k, v in r.items() if k != "tokens_per_sec"}
          for r in records]


def _rerun_equals_reference(workdir, args, env, reference):  # pylint: disable=redefined-outer-name
  proc = subprocess.run(_cli(workdir, args), capture_output=True, text=True,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert _strip(read_metrics(str(workdir))) == _strip(
      read_metrics(str(reference)))
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(np.testing.assert_array_equal, _params(reference, STEPS),
               _params(workdir, STEPS))
  assert not _leftovers(workdir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_then_rerun_equals_uninterrupted(
    corpus, env, reference, tmp_path, seed):  # pylint: disable=redefined-outer-name
  rng = random.Random(seed)
  args = _args(corpus)
  proc, logged = _run_until(tmp_path, args, env, rng.randrange(1, STEPS - 4),
                            rng.uniform(0.0, 0.3))
  proc.kill()
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  # A save is finished by the time MAX_IN_FLIGHT more steps are logged
  # (loop.py), so a kill loses at most CKPT_EVERY + MAX_IN_FLIGHT steps.
  due = [s for s in [1, *range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)]
         if s + MAX_IN_FLIGHT <= logged]
  if due:
    assert _finished_steps(tmp_path)[-1] >= due[-1], (logged, due)
  _rerun_equals_reference(tmp_path, args, env, reference)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130),
                                      (signal.SIGTERM, 143)])
def test_sigint_sigterm_stop_with_one_line_then_rerun_resumes(
    corpus, env, reference, tmp_path, sig, code):  # pylint: disable=redefined-outer-name
  args = _args(corpus)
  proc, _ = _run_until(tmp_path, args, env, 2 * CKPT_EVERY + 1, 0.0)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == code, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  latest = _finished_steps(tmp_path)[-1]
  assert last.startswith("interrupted at step "), last
  assert last.endswith(f"; the last checkpoint is step {latest}; re-run the "
                       "same command to resume."), last
  step = int(last.split()[3].rstrip(";"))
  assert 2 * CKPT_EVERY < step < STEPS
  assert latest >= step - CKPT_EVERY  # the save in flight was waited for
  _rerun_equals_reference(tmp_path, args, env, reference)
