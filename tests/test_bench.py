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
import pytest

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
  for mode in ("dynamo", "verified", "tree"):
    r = report[mode]
    assert 1.0 <= r["tokens_per_pass"] <= 3.0
    assert r["seconds"] > 0 and r["speedup_vs_ar"] > 0
    assert 0 < r["distinct_2_ratio"] and 0 < r["nll_ratio"]
    # speed-up = tokens per pass / pass price, on the timed calls
    assert r["speedup_vs_ar"] == pytest.approx(
        r["timed_tokens_per_pass"] / r["pass_price"])
  assert [row["mode"] for row in report["summary"]] == [
      "ar", "dynamo eps_b=0.5", "verified chain", "verified tree (8 paths)"]
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


def test_timed_modes_counts_passes_exactly():
  """AR and DynaMo at eps_b = 1 make one pass per token (the prefill
  included); DynaMo at eps_b = 0 without a table three tokens per pass."""
  from dynamo_jax.evaluation import prices
  model, stream = _model()
  prompts = bench.prompts_from_stream(stream, EOS, 2, 8)
  out = prices.timed_modes(
      model.config, model.params, prompts,
      {"eps1": dict(mode="dynamo", eps_b=1.0, cooc=model.cooc),
       "eps0": dict(mode="dynamo", eps_b=0.0)}, new_tokens=9, repeats=1)
  assert out["ar"]["passes"] == out["eps1"]["passes"] == 2 * 9
  assert out["ar"]["pass_price"] == 1.0
  assert out["eps0"]["passes"] == 2 * 3 and out["eps0"]["tokens_per_pass"] == 3
  for row in out.values():
    assert row["seconds_range"][0] <= row["seconds"] <= row["seconds_range"][1]


def test_bench_with_the_native_kernels(monkeypatch):
  """`matmul="native"` packs the model (pack_params is called, and the
  model's products go through the kernel) and keeps the exact modes exact:
  eps_b = 1 is still AR, one token per pass and an NLL ratio of exactly 1;
  `cooc_lookup="native"` reads the table with the native lookup."""
  from dynamo_jax.kernels import cpu_cooc, cpu_matmul
  calls = {"pack": 0, "kernel": 0, "lookup": 0}
  pack, kernel = cpu_matmul.pack_params, cpu_matmul.rows_matmul
  grid_bits = cpu_cooc.grid_bits

  def counted_lookup(*a):
    calls["lookup"] += 1
    return grid_bits(*a)

  def counted_pack(*a):
    calls["pack"] += 1
    return pack(*a)

  def counted_kernel(*a):
    calls["kernel"] += 1
    return kernel(*a)

  monkeypatch.setattr(cpu_matmul, "pack_params", counted_pack)
  monkeypatch.setattr(cpu_matmul, "rows_matmul", counted_kernel)
  monkeypatch.setattr(cpu_cooc, "grid_bits", counted_lookup)
  model, stream = _model()
  prompts = bench.prompts_from_stream(stream, EOS, 2, 8)
  report = bench.run_bench(model, prompts, eps_b=1.0, new_tokens=6,
                           seeds=(0,), timing_prompts=1, repeats=1, tree=2,
                           k_tree=2, matmul="native", cooc_lookup="native")
  assert calls["pack"] == 1 and calls["kernel"] > 0 and calls["lookup"] > 0
  assert report["setup"]["matmul"] == "native"
  assert report["setup"]["cooc_lookup"] == "native"
  assert report["dynamo"]["tokens_per_pass"] == 1.0
  assert report["dynamo"]["nll_ratio"] == 1.0
  with pytest.raises(dynamo_jax.InputError, match="matmul"):
    bench.run_bench(model, prompts, matmul="Native")
  with pytest.raises(dynamo_jax.InputError, match="cooc_lookup"):
    bench.run_bench(model, prompts, cooc_lookup="Native")
