"""Bad input at the command line, as a user gives it: the project's record of
the bad inputs tried.

Each case runs `python -m dynamo_jax ...` in a subprocess, in a folder the
case's `setup` filled, and asserts: exit code 2, exactly one line on stderr,
`error: ...`, naming the problem (`expect`), no traceback, and the folder
unchanged afterwards (nothing written, nothing half-written, nothing lost).
Add a case here for every bad input found.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from dynamo_jax.default_model import default_model_dir
from tests.conftest import make_hf_model, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  argv: list[str]
  expect: str                   # a substring of the one stderr line
  setup: Callable | None = None  # (tmp_path) -> None, fills the folder

  def __repr__(self):
    return self.id


def _write(name, data: bytes = b""):
  def setup(path):
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(data)
  return setup


def _npy(name, array):
  def setup(path):
    np.save(path / name, array)
  return setup


def _hf(path):
  save_hf(make_hf_model(), path / "hf")


def _both(*setups):
  def setup(path):
    for s in setups:
      s(path)
  return setup


CASES = [
    # --- usage (argparse): one line that points at --help ---
    Case("unknown-subcommand", ["fly"], "invalid choice: 'fly'"),
    Case("generate-no-prompt", ["generate", "--greedy"],
         "required: --prompt"),
    Case("generate-seed-not-int", ["generate", "--prompt", "a", "--seed",
                                   "abc"], "--seed: invalid int value"),
    Case("bench-sweep-not-number", ["bench", "--sweep", "0,abc"],
         "'abc' is not a number"),
    Case("bench-sweep-out-of-range", ["bench", "--sweep", "0,2"],
         "eps_b 2.0 is outside [0, 1]"),
    # --- generate ---
    Case("generate-empty-prompt", ["generate", "--prompt", ""],
         "--prompt is empty"),
    Case("generate-non-utf8-prompt",
         ["generate", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
         "--prompt is not valid UTF-8"),
    # --- convert ---
    Case("convert-missing-src", ["convert", "nope", "out"],
         "'nope' is neither a checkpoint directory"),
    Case("convert-out-under-a-file", ["convert", "hf", "afile/out"],
         "cannot write", _both(_hf, _write("afile", b"x"))),
    Case("convert-out-not-empty", ["convert", "hf", "full"],
         "already exists and is not empty",
         _both(_hf, _write("full/keep.txt", b"mine"))),
    # --- cooc ---
    Case("cooc-missing-data", ["cooc", "--data", "none.npy", "--out", "t.npz",
                               "--vocab-size", "9"], "no data file none.npy"),
    Case("cooc-empty-npy-file", ["cooc", "--data", "e.npy", "--out", "t.npz",
                                 "--vocab-size", "9"],
         "e.npy: not a readable .npy file (empty file)", _write("e.npy")),
    Case("cooc-empty-bin-file", ["cooc", "--data", "e.bin", "--out", "t.npz",
                                 "--vocab-size", "9"],
         "0 bytes is not a whole number of uint16 token ids",
         _write("e.bin")),
    Case("cooc-zero-tokens", ["cooc", "--data", "z.npy", "--out", "t.npz",
                              "--vocab-size", "9"],
         "no tokens in z.npy", _npy("z.npy", np.zeros((0,), np.int32))),
    Case("cooc-empty-text", ["cooc", "--data", "e.txt", "--out", "t.npz",
                             "--tokenizer", default_model_dir()],
         "no tokens in e.txt", _write("e.txt")),
    Case("cooc-out-exists", ["cooc", "--data", "a.npy", "--out", "t.npz",
                             "--vocab-size", "9"], "t.npz exists; pass --force",
         _both(_npy("a.npy", np.arange(9, dtype=np.int32)),
               _write("t.npz", b"old"))),
    Case("cooc-text-without-tokenizer", ["cooc", "--data", "a.txt", "--out",
                                         "t.npz"], "needs --tokenizer",
         _write("a.txt", b"text")),
    # --- train ---
    Case("train-unknown-config", ["train", "--config", "nope", "--workdir",
                                  "w"], "no config 'nope'"),
    Case("train-override-not-key-value", ["train", "--config", "tiny-test",
                                          "--workdir", "w", "lr"],
         "not of the form key=value"),
    Case("train-unknown-corpus", ["train", "--config", "tiny-test",
                                  "--workdir", "w",
                                  'data.paths=["corpus:nope"]'],
         "unknown corpus corpus:nope"),
]


def _tree(path) -> dict:
  """Every file and folder under `path` with its size, mode and mtime."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.lstat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mode,
                                          st.st_mtime_ns)
  return out


def run_cli(argv, cwd, timeout=300):
  env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
         "DYNAMO_CACHE": os.path.join(cwd, ".cache")}
  return subprocess.run([sys.executable, "-m", "dynamo_jax", *argv], cwd=cwd,
                        env=env, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path):
  if case.setup:
    case.setup(tmp_path)
  before = _tree(tmp_path)
  proc = run_cli(case.argv, str(tmp_path))
  err = proc.stderr.decode("utf-8", "replace")
  lines = [line for line in err.splitlines() if line.strip()]
  assert proc.returncode == 2, (proc.returncode, err)
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert case.expect in lines[0], (case.expect, lines[0])
  assert _tree(tmp_path) == before, "the bad input changed the folder"


def test_cases_have_unique_ids():
  ids = [c.id for c in CASES]
  assert len(ids) == len(set(ids))

