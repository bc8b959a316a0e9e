"""Multi-process `eval ppl` and `cooc`: two processes on 127.0.0.1 against
one process, on CPU (as tests/test_multihost.py does for training).

`eval ppl`: each process scores every other batch of windows with the same
jitted program and batch shape as one process, so the printed JSON must be
the same bytes, not merely close. `cooc`: counting is integer arithmetic,
so every array of the merged table must equal one process's."""

import json
import os
import subprocess
import sys

import numpy as np

from dynamo_jax import cooc
from tests.conftest import cpu_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "dynamo_jax", "default_model")
TEXTS = (
    "And the LORD spake unto Moses, saying, Speak unto the children of "
    "Israel.",
    "To be, or not to be: that is the question. Whether 'tis nobler in the "
    "mind to suffer",
    "In the beginning God created the heaven and the earth.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having "
    "little or no money in my purse",
)


def _cmd(*args):
  return [sys.executable, "-m", "dynamo_jax", *args]


def _one(args, devices=2):
  proc = subprocess.run(_cmd(*args), capture_output=True, text=True,
                        env=cpu_env(devices), cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _two(args, devices=1):
  """Processes 0 and 1 of one run: [(returncode, stdout, stderr)] each."""
  port = free_port()
  procs = [subprocess.Popen(
      _cmd(*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
           "2", "--process-id", str(p), "--coordinator-timeout", "120"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=cpu_env(devices), cwd=ROOT) for p in (0, 1)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _jsonl(path, texts=TEXTS):
  path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
  return str(path)


def test_two_processes_eval_ppl_like_one(tmp_path):
  # 4 documents, 87 scored positions: 7 windows of 16 in 3 batches of 3 (the
  # last one short), so the processes score 2 and 1 batches: the gather pads
  # process 1's and interleaves them.
  data = _jsonl(tmp_path / "docs.jsonl")
  args = ["eval", "ppl", "--data", data, "--eps-b", "0.5", "--window", "16",
          "--batch-size", "3", "--json"]
  one = _one(args, devices=2).stdout
  result = json.loads(one)
  assert result["documents"] == 4 and result["tokens_scored"] == 87
  assert 1.0 < result["tokens_per_pass_d"] < 3.0  # orders vary: not vacuous
  (rc0, out0, err0), (rc1, out1, err1) = _two(args, devices=2)
  assert (rc0, rc1) == (0, 0), (err0[-2000:], err1[-2000:])
  assert out0 == one  # the same bytes: no tolerance
  assert out1 == ""  # process 0 alone prints


def _token_files(tmp_path):
  """Four .npy files, documents separated by id 0 (EOS)."""
  rng = np.random.default_rng(0)
  paths = []
  for i, n in enumerate((500, 1200, 50, 900)):
    ids = rng.integers(1, 40, size=n)
    ids[rng.random(n) < 0.05] = 0
    paths.append(str(tmp_path / f"tok{i}.npy"))
    np.save(paths[-1], ids.astype(np.int32))
  return paths


def _same_table(a, b):
  assert a.metadata() == b.metadata()
  np.testing.assert_array_equal(a.unigram_counts, b.unigram_counts)
  assert sorted(a.keys) == sorted(b.keys)
  for m in a.keys:
    np.testing.assert_array_equal(a.keys[m], b.keys[m])
    np.testing.assert_array_equal(a.counts[m], b.counts[m])


def test_two_processes_count_like_one(tmp_path):
  # Token files and a text file (its documents tokenized by their process
  # only), documents numbered across files; pruning applies to the totals.
  data = _token_files(tmp_path) + [_jsonl(tmp_path / "docs.jsonl")]
  args = ["cooc", "--data", *data, "--tokenizer", TOKENIZER, "--doc-sep",
          "0", "--min-count", "2", "--corpus", "test"]
  _one([*args, "--out", str(tmp_path / "one" / "t.npz")], devices=1)
  out_dir = tmp_path / "two"
  results = _two([*args, "--out", str(out_dir / "t.npz")])
  assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
  assert "wrote" in results[0][2] and "wrote" not in results[1][2]
  assert os.listdir(out_dir) == ["t.npz"]  # the parts were removed
  one, two = (cooc.load(tmp_path / d / "t.npz") for d in ("one", "two"))
  _same_table(two, one)
  # Not vacuous: many documents, pruning removed n-grams, text was counted.
  assert one.num_documents > 100 and one.metadata()["min_count"] == 2
  unpruned = subprocess.run(
      _cmd(*args[:-4], "--out", str(tmp_path / "all.npz")),
      capture_output=True, text=True, env=cpu_env(1), cwd=ROOT, timeout=300)
  assert unpruned.returncode == 0, unpruned.stderr[-2000:]
  assert cooc.load(tmp_path / "all.npz").keys[3].size > one.keys[3].size
  assert one.unigram_counts[40:].sum() > 0


def test_a_failing_process_fails_the_run(tmp_path):
  """A token id out of range in process 1's document only: process 1 says
  so, process 0 says process 1 failed; nothing is written or left over."""
  good = np.asarray([1, 2, 3, 0, 4, 5, 99, 0], np.int32)  # doc 1: id 99
  np.save(tmp_path / "a.npy", good)
  results = _two(["cooc", "--data", str(tmp_path / "a.npy"), "--vocab-size",
                  "40", "--doc-sep", "0", "--out",
                  str(tmp_path / "out" / "t.npz")])
  assert [r[0] for r in results] == [2, 2]
  last = [r[2].strip().splitlines()[-1] for r in results]
  assert last[1].startswith("error: token id 99 is outside the vocabulary")
  assert last[0] == ("error: process 1 failed while counting: see its own "
                     "error.")
  assert os.listdir(tmp_path / "out") == []
