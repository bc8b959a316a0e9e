"""experiments/bench_step.py on the tiny config: the JSON it prints has every
figure, positive, and the bandwidth bound is null without a known bandwidth;
the bandwidth and peak-FLOP tables its bound and bench_train's MFU read
(dynamo_jax/evaluation/passes.py, hardware.py).

One timed run (with --bandwidth-gbs, so every figure exists) and one dry run
(lowering only) without it keep this to a few compiles.
"""

import importlib.util
import json
import os

import jax
import pytest

from dynamo_jax.evaluation import hardware
from dynamo_jax.evaluation.passes import device_bandwidth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
  path = os.path.join(ROOT, "experiments", "bench_step.py")
  spec = importlib.util.spec_from_file_location("bench_step", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_timed_run_reports_every_figure(bench, capsys):
  report = bench.main(["--presets", "tiny", "--batches", "1", "--context",
                       "16", "--repeats", "2", "--bandwidth-gbs", "100"])
  assert json.loads(capsys.readouterr().out) == report
  assert report["bandwidth"] == {"gbs": 100.0, "source": "--bandwidth-gbs",
                                 "reason": None}
  assert report["device"]["backend"] == jax.default_backend()
  tiny = report["results"]["tiny"]
  assert tiny["params"]["t3"] == tiny["params"]["t3_num_params_formula"]
  assert 0 < tiny["params"]["ar"] < tiny["params"]["t3"]
  row = tiny["batches"]["1"]
  for group in ("weight_bytes", "kv_bytes", "bound_ms"):
    assert all(_positive(v) for v in row[group].values()), (group, row[group])
  assert row["weight_bytes"]["ar"] < row["weight_bytes"]["t3"]
  assert row["kv_bytes"]["t3_slots_read"] == 16 + 3
  timings = [row["ar_step_ms"], row["t3_model_ms"],
             row["t3_model_one_unembed_ms"],
             *row["t3_step_ms"].values(), *row["t3_sampler_ms"].values()]
  assert len(timings) == 7
  for stats in timings:
    assert set(stats) == {"median", "p10", "pipelined", "calls"}
    assert all(_positive(v) for v in stats.values())
  assert all(_positive(v) for v in row["fraction_of_bound"].values())
  assert all(_positive(v) for v in row["ratio_t3_over_ar"].values())
  # One unembedding matmul for all heads changes the logits by rounding
  # only (the library keeps head 1's own matmul for bit-exactness).
  assert row["one_unembed_max_abs_logit_diff"] < 1e-4
  # eps_b = 0 without a table emits 3 tokens per pass, eps_b = 1 one.
  assert row["t3_mean_tokens_per_pass"] == {"eps_b_0": 3.0, "eps_b_1": 1.0}
  assert set(row["targets_met"]) == {"ar_fraction_of_bound",
                                     "t3_over_ar_eps_b_0",
                                     "t3_over_ar_eps_b_1"}
  assert all(isinstance(v, bool) for v in row["targets_met"].values())


def test_bound_is_null_without_bandwidth(bench, capsys):
  if jax.devices()[0].device_kind.lower() != "cpu":
    pytest.skip("the bound is null only on a device without a known bandwidth")
  report = bench.main(["--presets", "tiny", "--batches", "2", "--context",
                       "8", "--dry-run"])
  capsys.readouterr()
  assert report["bandwidth"]["gbs"] is None
  assert "--bandwidth-gbs" in report["bandwidth"]["reason"]
  row = report["results"]["tiny"]["batches"]["2"]
  assert row["bound_ms"] is None
  assert _positive(row["weight_bytes"]["ar"]) and _positive(row["kv_bytes"]["ar"])


@pytest.mark.parametrize("kind, gbs", [
    ("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0),
    ("NVIDIA H200", 4800.0), ("NVIDIA A100-SXM4-40GB", 1555.0),
    ("NVIDIA A100-SXM4-80GB", 2039.0), ("TPU v5 lite", 819.0),
    ("TPU v5", 2765.0), ("TPU v6 lite", 1640.0), ("TPU v4", 1200.0),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_bandwidth_table(kind, gbs):
  assert device_bandwidth(kind, None)[0] == gbs
  assert device_bandwidth(kind, 123.0) == (123.0, "--bandwidth-gbs")


def test_hardware_tables():
  bw = lambda kind: hardware.lookup(kind, hardware.BANDWIDTH_GBS,
                                    hardware.BANDWIDTH_EXACT_GBS)[0]
  assert bw("NVIDIA H100 80GB HBM3") == 3350.0
  assert bw("NVIDIA H100 PCIe") == 2000.0
  assert bw("TPU v5 lite") == 819.0
  assert bw("TPU v5") == bw("TPU v5p") == 2765.0  # v5p on a TPU VM
  assert bw("cpu") is None
  assert hardware.peak_bf16_flops("NVIDIA H200") == 989e12
  assert hardware.peak_bf16_flops("TPU v5") == 459e12
  assert hardware.peak_bf16_flops("TPU v5 lite") == 197e12
  assert hardware.peak_bf16_flops("cpu") is None
