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
import json
import os
import shutil
import struct
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from dynamo_jax.default_model import default_model_dir
from tests.conftest import free_port, make_hf_model, save_hf

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


def _default_copy(name="m"):
  """A copy of the embedded DynaMo-T3 (native format, with checksums.json)."""
  def setup(path):
    shutil.copytree(default_model_dir(), path / name)
  return setup


def _poke(path, tensor, data: bytes):
  """Overwrites bytes in the middle of `tensor`'s data in a safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    start, end = json.loads(f.read(n))[tensor]["data_offsets"]
  with open(path, "r+b") as f:
    f.seek(8 + n + (start + end) // 2 // 4 * 4)
    f.write(data)


def _flip_tensor(tensor, data, drop_checksums=False):
  def setup(path):
    if drop_checksums:
      (path / "m" / "checksums.json").unlink()
    _poke(path / "m" / "params.safetensors", tensor, data)
  return setup


def _edit_json(name, edit):
  def setup(path):
    meta = json.loads((path / name).read_text())
    edit(meta)
    (path / name).write_text(json.dumps(meta))
  return setup


def _rm(name):
  def setup(path):
    (path / name).unlink()
  return setup


def _hf_tensor(name, fn):
  """_hf, then one tensor of hf/model.safetensors replaced by fn(tensor);
  with the embedded model's tokenizer.json, so `generate --model hf` reaches
  the weights."""
  def setup(path):
    from safetensors.numpy import load_file, save_file
    _hf(path)
    st = path / "hf" / "model.safetensors"
    tensors = load_file(st)
    tensors[name] = fn(tensors[name])
    save_file(tensors, st, {"format": "pt"})
    shutil.copy(os.path.join(default_model_dir(), "tokenizer.json"),
                path / "hf")
  return setup


def _nan_at_7(w):
  w = w.copy()
  w.reshape(-1)[7] = np.nan
  return w


def _hf_bin(path):
  save_hf(make_hf_model(), path / "hf", fmt="bin")


def _truncate(name):
  def setup(path):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[:len(data) // 2])
  return setup


class _NotWeights:  # module level, so torch.save can pickle it
  pass


def _pickled_bin(path):
  import torch
  _hf_bin(path)
  torch.save({"w": torch.zeros(2), "x": _NotWeights()},
             path / "hf" / "pytorch_model.bin")


def _dynamo_hf(path):
  """A DynaMo-T3 exported with to_hf: hf/ holds dynamo_heads.safetensors."""
  import dynamo_jax
  config, params = dynamo_jax.from_hf(save_hf(make_hf_model(), path / "base"))
  config, params = dynamo_jax.add_heads(config, params, 3, rng=0)
  dynamo_jax.to_hf(config, params, path / "hf")
  shutil.rmtree(path / "base")


def _heads_metadata(**changes):
  def setup(path):
    from safetensors.numpy import load_file, save_file
    from dynamo_jax.fileio import SafetensorsReader
    st = str(path / "hf" / "dynamo_heads.safetensors")
    meta = {**SafetensorsReader(st).metadata, **changes}
    save_file(load_file(st), st, meta)
  return setup


def _native(path):
  import dynamo_jax
  config, params = dynamo_jax.from_hf(save_hf(make_hf_model(), path / "base"))
  dynamo_jax.save_native(config, params, path / "nat")
  shutil.rmtree(path / "base")


_TRAINED = {}


def _trained_run(corrupt=False):
  """tiny-test trained 10 steps in W on text/ (checkpoints at steps 1 and 10;
  trained once per test session, then copied); text2/ is the same text
  under another name."""
  def setup(path):
    if "dir" not in _TRAINED:
      import tempfile
      base = tempfile.mkdtemp(prefix="dynamo-bad-inputs-")
      for d in ("text", "text2"):
        os.mkdir(os.path.join(base, d))
        with open(os.path.join(base, d, "a.txt"), "w") as fh:
          fh.write("To be, or not to be, that is the question. " * 200)
      subprocess.run([sys.executable, "-m", "dynamo_jax", "train", "--config",
                      "tiny-test", "--workdir", "W", "--steps", "10",
                      'data.paths=["text"]'], cwd=base,
                     env={**os.environ, "PYTHONPATH": ROOT}, check=True,
                     capture_output=True, timeout=600)
      _TRAINED["dir"] = base
    for name in ("text", "text2", "W"):
      shutil.copytree(os.path.join(_TRAINED["dir"], name), path / name,
                      symlinks=True)
    if corrupt:
      for step in (path / "W" / "checkpoints").iterdir():
        (step / "state" / "_METADATA").write_text("garbled")
  return setup


_T = ["train", "--config", "tiny-test", "--workdir", "W"]
_CHAT_T = ["train", "--config", "chat-default", "--workdir", "W"]
_CHAT = ["eval", "chat", "--questions", "q.jsonl", "--out", "o"]
_QLINE = b'{"question_id": 1, "category": "c", "turns": ["a"]}\n'


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
    Case("bench-unknown-shape", ["bench", "--project-shape", "dynamo-9b"],
         "unknown suite shape 'dynamo-9b'"),
    Case("bench-tree-zero", ["bench", "--tree", "0"],
         "'0' is not a positive integer"),
    Case("generate-tree-in-dynamo-mode", ["generate", "--prompt", "a",
                                          "--mode", "dynamo", "--tree", "4"],
         "tree=4 is a verified-mode option"),
    # --- generate ---
    Case("generate-empty-prompt", ["generate", "--prompt", ""],
         "--prompt is empty"),
    Case("generate-non-utf8-prompt",
         ["generate", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
         "--prompt is not valid UTF-8"),
    # --- chat (each refused before the first prompt) ---
    Case("chat-bad-mode", ["chat", "--mode", "beam"],
         "argument --mode: invalid choice: 'beam'"),
    Case("chat-eps-b", ["chat", "--eps-b", "2"], "eps_b must lie in [0, 1]"),
    Case("chat-max-new-tokens-too-many", ["chat", "--max-new-tokens", "600"],
         "exceeds max_position_embeddings=512"),
    Case("chat-template-does-not-render", ["chat", "--model", "m"],
         "the chat template does not render",
         _both(_default_copy(), _edit_json(
             "m/tokenizer_config.json",
             lambda c: c.update(chat_template="{% for %}")))),
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
    # --- damaged weights: refused naming the tensor and its file ---
    Case("generate-flipped-bytes-in-a-tensor",
         ["generate", "--model", "m", "--prompt", "And", "--json"],
         "tensor layers_2/mlp/in_kernel in m/params.safetensors does not "
         "match its sha256 in checksums.json",
         _both(_default_copy(), _flip_tensor("layers_2/mlp/in_kernel",
                                             np.float32(1.5).tobytes()))),
    Case("generate-nan-in-old-checkpoint-without-checksums",
         ["generate", "--model", "m", "--prompt", "And", "--json"],
         "tensor heads_3/mlp/out_bias in m/params.safetensors holds "
         "non-finite values",
         _both(_default_copy(), _flip_tensor("heads_3/mlp/out_bias",
                                             b"\xff\xff\xff\xff",
                                             drop_checksums=True))),
    Case("generate-unreadable-checksums",
         ["generate", "--model", "m", "--prompt", "And"],
         "cannot read the checksums m/checksums.json",
         _both(_default_copy(), _write("m/checksums.json", b"{not json"))),
    Case("generate-hf-nan-embedding",
         ["generate", "--model", "hf", "--prompt", "And"],
         "tensor gpt_neox.embed_in.weight in hf/model.safetensors holds "
         "non-finite values",
         _hf_tensor("gpt_neox.embed_in.weight", _nan_at_7)),
    Case("generate-hf-int32-embedding",
         ["generate", "--model", "hf", "--prompt", "And"],
         "tensor gpt_neox.embed_in.weight in hf/model.safetensors has dtype "
         "int32, but parameters are floating point",
         _hf_tensor("gpt_neox.embed_in.weight", lambda w: w.astype(np.int32))),
    Case("generate-hf-float16-overflow",
         ["generate", "--model", "hf", "--prompt", "And", "--dtype",
          "float16"],
         "dense_4h_to_h.bias in hf/model.safetensors, cast to float16, holds "
         "non-finite values",
         _hf_tensor("gpt_neox.layers.1.mlp.dense_4h_to_h.bias",
                    lambda b: b * 1e6)),
    # --- damaged or incomplete checkpoint files ---
    Case("generate-unknown-top-level-config-key",
         ["generate", "--model", "m", "--prompt", "And"],
         "m/dynamo_config.json has unknown top-level keys ['extra']",
         _both(_default_copy(), _edit_json("m/dynamo_config.json",
                                           lambda m: m.update(extra=1)))),
    Case("generate-missing-params",
         ["generate", "--model", "m", "--prompt", "And"],
         "m has dynamo_config.json but no params.safetensors",
         _both(_default_copy(), _rm("m/params.safetensors"))),
    Case("convert-truncated-bin", ["convert", "hf", "out"],
         "hf/pytorch_model.bin is truncated or corrupt",
         _both(_hf_bin, _truncate("hf/pytorch_model.bin"))),
    Case("convert-bin-with-pickled-objects", ["convert", "hf", "out"],
         "hf/pytorch_model.bin is not a plain weights file: it holds "
         "non-tensor Python objects, which dynamo_jax refuses to unpickle "
         "for safety", _pickled_bin),
    Case("convert-heads-file-unknown-metadata", ["convert", "hf", "out"],
         "hf/dynamo_heads.safetensors: metadata keys ['colour'] are not "
         "understood", _both(_dynamo_hf, _heads_metadata(colour="blue"))),
    Case("convert-heads-file-too-many-heads", ["convert", "hf", "out"],
         "hf/dynamo_heads.safetensors: num_token_heads must be an integer "
         "in 1..8", _both(_dynamo_hf, _heads_metadata(num_token_heads="9"))),
    # --- where checkpoints come from ---
    Case("generate-missing-dir-that-looks-like-a-hub-id",
         ["generate", "--model", "fx/nonexistent_dir", "--prompt", "And"],
         "no local directory 'fx/nonexistent_dir' exists"),
    Case("generate-missing-nested-dir",
         ["generate", "--model", "a/b/c", "--prompt", "And"],
         "no local directory of that name exists"),
    Case("generate-model-is-a-file",
         ["generate", "--model", "m/params.safetensors", "--prompt", "And"],
         "m/params.safetensors is a file, not a checkpoint directory",
         _default_copy()),
    Case("convert-to-hf-out-under-a-file",
         ["convert", "--to-hf", "nat", "afile/out"], "cannot write",
         _both(_native, _write("afile", b"x"))),
    # --- eval ---
    Case("table4-model-without-data", ["eval", "table4", "--model", "m"],
         "give --data (held-out text for the model's prompts)"),
    Case("table4-unknown-model", ["eval", "table4", "--models", "dynamo-9b-t3",
                                  "--tokens-per-pass", "2"],
         "unknown suite models ['dynamo-9b-t3']"),
    Case("ppl-data-missing", ["eval", "ppl", "--data", "none.txt"],
         "data file none.txt does not exist"),
    Case("ppl-data-empty", ["eval", "ppl", "--data", "e.txt"],
         "e.txt has no text to score", _write("e.txt")),
    Case("ppl-other-vocabulary", ["eval", "ppl", "--data", "ids.npy"],
         "outside this model's vocabulary of 4096",
         _npy("ids.npy", np.array([5, 50000, 0], np.int32))),
    Case("ppl-eps-b", ["eval", "ppl", "--data", "a.txt", "--eps-b", "2"],
         "--eps-b must lie in [0, 1]", _write("a.txt", b"To be.")),
    Case("completions-eps-b", ["eval", "completions", "--eps-b-grid", "0,1.5",
                               "--out", "o"], "must lie in [0, 1]"),
    Case("completions-out-file", ["eval", "completions", "--out", "f"],
         "is a file", _write("f", b"x")),
    Case("completions-prompts-missing", ["eval", "completions", "--prompts",
                                         "nope.txt", "--out", "o"],
         "does not exist"),
    Case("completions-prompts-csv", ["eval", "completions", "--prompts",
                                     "p.csv", "--out", "o"], "must be .txt",
         _write("p.csv", b"a\n")),
    Case("chat-questions-not-jsonl", _CHAT, "q.jsonl line 1 is not JSON",
         _write("q.jsonl", b"What is truth?\n")),
    Case("chat-questions-no-turns", _CHAT, 'q.jsonl line 2 has no "turns"',
         _write("q.jsonl", _QLINE + b'{"question_id": 2, "category": "c"}\n')),
    Case("chat-questions-turns-not-strings", _CHAT,
         'q.jsonl line 1: "turns" must be a non-empty list of non-empty '
         "strings", _write("q.jsonl", b'{"question_id": 1, "category": "c", '
                           b'"turns": ["a", 2]}\n')),
    Case("chat-questions-duplicate-id", _CHAT,
         "q.jsonl line 2 repeats question_id 1 (first on line 1)",
         _write("q.jsonl", _QLINE * 2)),
    Case("chat-judge-unreachable",
         ["eval", "chat", "--judge-url", f"http://127.0.0.1:{free_port()}/v1",
          "--judge-model", "m", "--out", "o"],
         "cannot reach the judge at http://127.0.0.1:"),
    Case("chat-api-key-env-unset",
         ["eval", "chat", "--judge-url", "http://127.0.0.1:9/v1",
          "--judge-model", "m", "--api-key-env", "DYNAMO_TEST_UNSET_KEY_VAR",
          "--out", "o"],
         "--api-key-env names $DYNAMO_TEST_UNSET_KEY_VAR, which is not set"),
    # --- train: config values (test_config.py checks every key in-process;
    # these go through the CLI and must not create the workdir) ---
    Case("train-lr-negative", [*_T, "optim.lr_base=-1"],
         "optim.lr_base must be a finite number > 0, got -1"),
    Case("train-lr-string", [*_T, "optim.lr_base=abc"],
         'optim.lr_base must be a finite number > 0, got "abc"'),
    Case("train-steps-flag-zero", [*_T, "--steps", "0"],
         "steps must be an integer in 1..2147483647, got 0"),
    Case("train-seed-negative", [*_T, "seed=-1"],
         "seed must be an integer in 0..4294967295, got -1"),
    Case("train-head-weights-count", [*_T, "optim.head_loss_weights=[1,1]"],
         "optim.head_loss_weights must hold one weight per token head"),
    Case("train-mesh-two-rest", [*_T, "mesh.data=-1"],
         "at most one mesh axis may be -1"),
    Case("train-dtype", [*_T, "model.dtype=float64"],
         "model.dtype must be one of ['float32', 'bfloat16', 'float16']"),
    Case("train-override-unknown", [*_T, "model.overrides.foo=1"],
         "unknown config keys ['model.overrides.foo']"),
    Case("train-seq-len-too-long", [*_T, "seq_len=129"],
         "seq_len must lie in 4..128"),
    Case("train-bool-as-int", [*_T, "async_checkpoints=1"],
         "async_checkpoints must be true or false, got 1"),
    Case("train-data-shuffle", [*_T, "data.shuffle=yes"],
         'data.shuffle must be true or false, got "yes"'),
    Case("train-data-source", [*_T, "data.source=csv"],
         "data.source must be one of ['tfds', 'text', 'jsonl', 'tokens', "
         "'instructions']"),
    # --- train: chat fine-tuning on instruction records ---
    Case("train-chat-record-no-output", [*_CHAT_T, 'data.paths=["i.jsonl"]'],
         "i.jsonl: record 2 (line 2): field 'output' is missing",
         _write("i.jsonl", b'{"instruction": "a", "output": "b"}\n'
                b'{"instruction": "Who art thou?", "input": ""}\n')),
    Case("train-chat-empty-response", [*_CHAT_T, 'data.paths=["i.json"]'],
         "i.json: record 3: field 'output' is empty",
         _write("i.json", json.dumps([{"instruction": "a", "output": "b"}] * 2
                                     + [{"instruction": "c", "output": ""}]
                                     ).encode())),
    Case("train-chat-template-does-not-render",
         [*_CHAT_T, "data.chat_template=t.jinja"],
         "the chat template does not render",
         _write("t.jinja", b"{% for m in messages %}{{ m.content }")),
    Case("train-chat-template-not-in-pretraining",
         [*_T, "data.chat_template=t.jinja"],
         "data.heldout_every and data.chat_template apply to data.source "
         "'instructions' only"),
    # --- train: runs and resumes ---
    Case("train-data-missing", [*_T, 'data.paths=["/nonexistent"]'],
         "data file '/nonexistent' does not exist"),
    Case("train-resume-fewer-steps", [*_T, "--steps", "5",
                                      'data.paths=["text"]'],
         "is already at step 10; nothing was done", _trained_run()),
    Case("train-resume-batch-size", [*_T, "--steps", "20",
                                     'data.paths=["text"]',
                                     "global_batch_size=16"],
         "trained with other settings (global_batch_size 8 -> 16)",
         _trained_run()),
    Case("train-resume-other-data", [*_T, "--steps", "20",
                                     'data.paths=["text2"]'],
         "(data.paths ['text'] -> ['text2'])", _trained_run()),
    Case("train-resume-other-model", [*_T, "--steps", "20",
                                      'data.paths=["text"]',
                                      "model.overrides.hidden_size=32"],
         "written for another model: hidden_size 64 -> 32", _trained_run()),
    Case("train-resume-no-step-restores", [*_T, "--steps", "20",
                                           'data.paths=["text"]'],
         "restores (step 10: JSONDecodeError", _trained_run(corrupt=True)),
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

