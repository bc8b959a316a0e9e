"""The command line, run as a user would (subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
import transformers

import dynamo_jax
from tests.conftest import make_hf_model, save_hf, torch_logits


def _run(*args):
  return subprocess.run([sys.executable, "-m", "dynamo_jax", *args],
                        capture_output=True, text=True, timeout=300)


def test_convert_both_ways(tmp_path, rng):
  model = make_hf_model()
  src = save_hf(model, tmp_path / "hf")
  proc = _run("convert", src, str(tmp_path / "ours"))
  assert proc.returncode == 0, proc.stderr
  assert "100%" in proc.stderr  # the progress bar ran to the end
  config, params = dynamo_jax.load_native(str(tmp_path / "ours"))
  ids = rng.randint(0, config.vocab_size, size=(2, 9))
  ref = torch_logits(model, ids)
  assert np.abs(np.asarray(dynamo_jax.forward(config, params, ids)) - ref).max() <= 1e-4

  proc = _run("convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back"))
  assert proc.returncode == 0, proc.stderr
  back = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "back")
  assert np.abs(torch_logits(back, ids) - ref).max() <= 1e-4


def test_convert_errors_are_one_line(tmp_path):
  proc = _run("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "out")


def test_generate_default_model_json():
  """No --model: the embedded DynaMo-T3 and its tokenizer, offline."""
  proc = _run("generate", "--prompt", "KING HENRY: Once more", "--max-new-tokens",
              "12", "--json", "--seed", "3")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert len(out["token_ids"]) == 12 and out["text"].strip()
  assert out["forward_passes"] == 12 and out["tokens_per_pass"] == 1.0
  assert out["seconds"] > 0
  proc = _run("generate", "--prompt", "And God said", "--mode", "dynamo",
              "--eps-b", "0", "--no-cooc", "--max-new-tokens", "12", "--json")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["forward_passes"] == 4 and out["tokens_per_pass"] == 3.0
