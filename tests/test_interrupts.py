"""`kill -9`, SIGTERM and Ctrl-C during `convert` and `cooc`, as a user would
send them: afterwards the output is absent or complete, the next run removes
what the killed one left, and a re-run gives the uninterrupted result.
(Training's kills are in test_kill.py.)"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import make_hf_model, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)


def _start(argv, cwd):
  env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
  return subprocess.Popen([sys.executable, "-m", "dynamo_jax", *argv], cwd=cwd,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def _finish(argv, cwd):
  proc = _start(argv, cwd)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()
  return out, err


def _kill_when(proc, pattern, delay, timeout=120):
  """Sends SIGKILL `delay` seconds after a file matching `pattern` appears
  (the output being written), or when the process ends by itself first.
  Returns whether the kill landed while the process ran; fails when the
  file never appeared (the test would then prove nothing)."""
  end = time.monotonic() + timeout
  while not glob.glob(pattern):
    assert proc.poll() is None, f"ended before {pattern} appeared"
    assert time.monotonic() < end, f"{pattern} never appeared"
    time.sleep(0.002)
  time.sleep(delay)
  if proc.poll() is not None:
    return False
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True


def _leftovers(directory, name):
  return glob.glob(os.path.join(directory, f".{name}.tmp-*"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  # ~12 MB of weights, so writing them takes long enough to be interrupted.
  model = make_hf_model(vocab_size=4099, hidden_size=192, num_hidden_layers=4,
                        num_attention_heads=3, intermediate_size=769)
  return save_hf(model, tmp_path_factory.mktemp("src") / "hf")


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "ours"
  _finish(["convert", hf_dir, str(out)], str(out.parent))
  return out


def _same_dir(a, b):
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b))
  for name in names:
    with open(os.path.join(a, name), "rb") as fa, open(
        os.path.join(b, name), "rb") as fb:
      assert fa.read() == fb.read(), name


@pytest.mark.parametrize("seed", SEEDS)
def test_kill9_during_convert(seed, hf_dir, converted, tmp_path):
  rng = np.random.RandomState(seed)
  out = tmp_path / "ours"
  argv = ["convert", hf_dir, str(out)]
  proc = _start(argv, str(tmp_path))
  landed = _kill_when(proc, str(tmp_path / ".ours.tmp-*"),
                      delay=rng.uniform(0, 0.4))
  # Absent or complete, never half-written.
  assert not out.exists() or sorted(os.listdir(out)) == sorted(
      os.listdir(converted))
  if landed and not out.exists():
    assert _leftovers(tmp_path, "ours")  # the killed run's temp dir ...
  if not out.exists():
    _finish(argv, str(tmp_path))
  assert not _leftovers(tmp_path, "ours")  # ... is gone after the next run
  _same_dir(out, converted)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_during_convert(sig, code, word, hf_dir, tmp_path):
  out = tmp_path / "ours"
  proc = _start(["convert", hf_dir, str(out)], str(tmp_path))
  pattern = str(tmp_path / ".ours.tmp-*")
  while not glob.glob(pattern) and proc.poll() is None:
    time.sleep(0.005)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  err = err.decode()
  if proc.returncode == 0:
    pytest.skip("convert finished before the signal arrived")
  assert proc.returncode == code, err
  assert "Traceback" not in err and word in err.splitlines()[-1], err
  assert not out.exists() and not _leftovers(tmp_path, "ours")


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_an_interrupt_inside_mkdtemp_leaves_nothing(kind, tmp_path,
                                                    monkeypatch):
  # The window the signal tests above hit by chance: the temp entry exists
  # (so the test signals) but mkdtemp / mkstemp has not returned its name.
  import tempfile  # pylint: disable=import-outside-toplevel
  from dynamo_jax import fileio  # pylint: disable=import-outside-toplevel
  name = "mkdtemp" if kind == "dir" else "mkstemp"
  real = getattr(tempfile, name)

  def made_then_interrupted(*args, **kwargs):
    made = real(*args, **kwargs)
    if kind == "file":
      os.close(made[0])
    raise KeyboardInterrupt

  monkeypatch.setattr(tempfile, name, made_then_interrupted)
  with pytest.raises(KeyboardInterrupt):
    if kind == "dir":
      with fileio.atomic_dir(tmp_path / "out"):
        pass
    else:
      fileio.atomic_write(tmp_path / "out", lambda fh: fh.write(b"x"))
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "ids.npy"
  rng = np.random.RandomState(0)
  np.save(path, rng.zipf(1.3, size=3_000_000).clip(max=999).astype(np.int32))
  return str(path)


def _cooc_argv(tokens, out, spill):
  return ["cooc", "--data", tokens, "--out", str(out), "--vocab-size", "1000",
          "--memory-gb", "0.004", "--spill-dir", str(spill)]


@pytest.fixture(scope="module")
def cooc_ref(tokens, tmp_path_factory):
  where = tmp_path_factory.mktemp("cooc_ref")
  (where / "spill").mkdir()
  _finish(_cooc_argv(tokens, where / "t.npz", where / "spill"), str(where))
  return _arrays(where / "t.npz")


def _arrays(path):
  # The arrays, not the bytes: a .npz's zip entries carry their write time.
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _same_table(path, ref):
  got = _arrays(path)
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("seed", SEEDS)
def test_kill9_during_cooc(seed, tokens, cooc_ref, tmp_path):
  rng = np.random.RandomState(seed)
  spill = tmp_path / "spill"
  spill.mkdir()
  out = tmp_path / "t.npz"
  argv = _cooc_argv(tokens, out, spill)
  proc = _start(argv, str(tmp_path))
  # Seeds 0 and 1 kill while spilled counts exist, seed 2 while the table
  # file is being written.
  pattern = (str(spill / ".dynamo-cooc-spill.tmp-*") if seed < 2
             else str(tmp_path / ".t.npz.tmp-*"))
  _kill_when(proc, pattern, delay=rng.uniform(0, 0.05 if seed < 2 else 0.2))
  if out.exists():  # the kill came after the rename: complete
    _same_table(out, cooc_ref)
  else:
    _finish(argv, str(tmp_path))
  _same_table(out, cooc_ref)
  assert not _leftovers(tmp_path, "t.npz")
  assert not os.listdir(spill)  # the killed run's spills were removed
