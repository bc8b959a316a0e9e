"""Stages `base` (export) and `package`: the trained runs in the shapes the
next step needs.

- The base's final params become an HF GPT-NeoX directory (WORK/base_hf),
  which the heads' run starts from (`model.init=hf`) and the model card
  evaluates as the base model.
- The DynaMo-T3 run's final params, the tokenizer, the co-occurrence table
  and a small test-split sample become the shipped artifact in OUT, in
  dynamo_jax's own format. Params are stored as bfloat16 to fit the 30 MB
  budget while the config keeps float32 compute: `native.load` upcasts them
  (bfloat16 -> float32 is exact), and matmuls in float32 are the fast path
  on CPU.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np

import dynamo_jax
from dynamo_jax.convert import native
from dynamo_jax.evaluation import split_documents

import runs

# Files the package stage owns in OUT; anything else there (the loader's
# __init__.py) is left alone.
ARTIFACT_FILES = ("dynamo_config.json", "params.safetensors", "checksums.json",
                  "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json",
                  "cooc.npz", "test_sample.npy")
SAMPLE_TOKENS_PER_DOC = 2500


def export_base(work: str) -> str:
  config, params = runs.final_params(runs.BASE_CONFIG,
                                     os.path.join(work, "base"),
                                     runs.data_overrides(work))
  out = os.path.join(work, "base_hf")
  if os.path.isdir(out):
    shutil.rmtree(out)
  return dynamo_jax.to_hf(config, params, out,
                          tokenizer_dir=os.path.join(work, "tokenizer"))


def test_sample(work: str, eos_id: int) -> np.ndarray:
  """The first SAMPLE_TOKENS_PER_DOC tokens of every test document, each
  closed by EOS: a fixed ~20k-token slice of the test split that ships with
  the artifact, for the embedded model's test (the corpus is not shipped)."""
  docs = split_documents(np.load(os.path.join(work, "tokens", "test.npy")),
                         eos_id)
  pieces = []
  for doc in docs:
    body = doc[:-1] if doc[-1] == eos_id else doc
    pieces.extend([body[:SAMPLE_TOKENS_PER_DOC], np.array([eos_id])])
  return np.concatenate(pieces).astype(np.uint16)


def package(work: str, out: str) -> dict:
  """Writes the artifact files into OUT; returns their sizes in bytes."""
  config, params = runs.final_params(runs.HEADS_CONFIG,
                                     os.path.join(work, "heads"),
                                     runs.heads_overrides(work))
  params_bf16 = jax.tree.map(
      lambda p: np.asarray(p, np.float32).astype(ml_dtypes.bfloat16), params)
  os.makedirs(out, exist_ok=True)
  for name in ARTIFACT_FILES:
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  with tempfile.TemporaryDirectory(dir=work) as tmp:
    staged = native.save(config, params_bf16, os.path.join(tmp, "model"),
                         tokenizer_dir=os.path.join(work, "tokenizer"))
    for path in glob.glob(os.path.join(staged, "*")):
      shutil.move(path, os.path.join(out, os.path.basename(path)))
  shutil.copy(os.path.join(work, "cooc.npz"), os.path.join(out, "cooc.npz"))
  np.save(os.path.join(out, "test_sample.npy"),
          test_sample(work, config.eos_token_id))
  return {name: os.path.getsize(os.path.join(out, name))
          for name in ARTIFACT_FILES if os.path.exists(os.path.join(out, name))}
