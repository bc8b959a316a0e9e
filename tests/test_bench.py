"""`dynamo_jax bench` (evaluation/bench.py) end to end on a tiny random
DynaMo-T3 with a co-occurrence table counted from random documents.

What can be checked exactly is checked: eps_b = 1 is plain AR with the same
seeds (DynaMo.md; tests/test_decoding.py holds the decoder to it), so its
sweep rows must show 1 token per pass and NLL and distinct-2 ratios of
exactly 1; eps_b = 0 without a table emits 3 tokens every pass. Timings are
only checked for being positive.
"""

import json
import os

import jax
import numpy as np

import dynamo_jax
from dynamo_jax import cooc
from dynamo_jax.api import Model
from dynamo_jax.evaluation import bench

EOS = 0


def _model():
  config = dynamo_jax.model.config.tiny_config(num_token_heads=3,
                                               vocab_size=97)
  params = dynamo_jax.init_params(config, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p * 6.0 if p.ndim == 2 else p, params)
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 12, size=400) for _ in range(4)]  # a dense table
  table = cooc.count_ngrams(docs, config.vocab_size, 3, min_count=1)
  stream = np.concatenate([np.append(d, EOS) for d in docs])
  return Model(config, params, None, table), stream


def test_bench_report_and_sweep(tmp_path):
  model, stream = _model()
  prompts = bench.prompts_from_stream(stream, EOS, 2, 8)
  assert prompts.shape == (2, 8)
  report = bench.run_bench(model, prompts, eps_b=0.5, new_tokens=9,
                           seeds=(0, 1), timing_prompts=1, repeats=1,
                           sweep=(0.0, 1.0), sweep_out=str(tmp_path),
                           sweep_without_table=True)
  json.dumps(report)  # JSON-able
  for mode in ("dynamo", "verified"):
    r = report[mode]
    assert 1.0 <= r["tokens_per_pass"] <= 3.0
    assert r["seconds"] > 0 and r["speedup_vs_ar"] > 0
    assert 0 < r["distinct_2_ratio"] and 0 < r["nll_ratio"]
  # Verified sampling keeps AR's distribution, not its exact tokens; greedy
  # identity is tested in test_decoding.py.
  split = report["step_split"]
  assert split["model_ms"] > 0 and split["sampler_ms"] > 0
  rows = {(r["cooc"], r["eps_b"]): r for r in report["sweep"]}
  assert set(rows) == {(True, 0.0), (True, 1.0), (False, 0.0), (False, 1.0)}
  for table in (True, False):
    ar_like = rows[(table, 1.0)]
    assert ar_like["tokens_per_pass"] == 1.0
    assert ar_like["nll_ratio"] == 1.0
    assert ar_like["distinct_2_ratio"] == 1.0
  assert rows[(False, 0.0)]["tokens_per_pass"] == 3.0
  assert report["closest"]["cooc"] in (True, False)
  with open(tmp_path / "eps_b_sweep.json") as fh:
    assert len(json.load(fh)["sweep"]) == 4
  assert os.path.getsize(tmp_path / "eps_b_sweep.png") > 0
