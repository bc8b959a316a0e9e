"""Per-decode-step cost of DynaMo's grid work: Pallas kernel vs jnp reference.

Times `dynamo_jax.kernels.threshold_and_draw` (orders 2..n of one decode
step: joint grid, co-occurrence weighting, blur, Otsu, eps_b, penalty,
back-off, draw) with kernel="pallas" and kernel="reference", each jitted,
at k = 50, n = 3 (grids of 2,500 and 125,000 entries per row), batch 1 and
32, eps_b = 0.5, on this machine's default device. The co-occurrence
weights are given as dense random grids (~half exactly 0): the table
look-up is the same XLA gather on both paths and is not timed.

On CPU the kernel runs in Pallas interpret mode (the only way it runs
there): its figures are labelled `"pallas_mode": "interpret"` and say
nothing about accelerator speed. The target (kernel >= 1.5x faster than the
reference, and <= 5% of a pythia-1.4b-shaped T3 decode step) needs a GPU or
TPU; with --model-step (default on an accelerator) the script also times
that decode step's forward pass (`forward_cached`, DynaMo-1.5B-T3 shape,
random bf16 weights, a 3-token chunk against a 512-token cache) and reports
the kernel's share of forward + kernel.

Each timing is the median over `--repeats` calls after one warm-up (the
compile), each ended by block_until_ready. Prints one JSON object:

  .venv/bin/python experiments/bench_kernel.py
  .venv/bin/python experiments/bench_kernel.py --batches 1 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.kernels import threshold_and_draw

K, N = 50, 3


def _inputs(batch: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  logits = rng.randn(batch, N, K) * 3.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = -np.sort(-(p / p.sum(-1, keepdims=True)), axis=-1)
  ids = rng.randint(0, 50304, size=(batch, N, K))
  seen = rng.rand(batch, N, K) < 0.05
  weights = []
  for m in range(2, N + 1):
    shape = (batch,) + (K,) * m
    weights.append(jnp.asarray(
        rng.gamma(0.5, size=shape) * (rng.rand(*shape) > 0.5), jnp.float32))
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(p, jnp.float32),
          jnp.asarray(seen), weights, jnp.float32(0.5), jnp.float32(1.1),
          jnp.asarray(rng.rand(batch), jnp.float32))


def _median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _model_step_ms(batch: int, repeats: int) -> float:
  """Median ms of one cached forward pass of a DynaMo-1.5B-T3-shaped model
  (all heads, a 3-token chunk per row, 512 cache slots), bf16."""
  from dynamo_jax.model import (dynamo_preset, forward_cached, init_cache,
                                init_params)
  config = dynamo_preset("DynaMo-1.5B-T3", dtype="bfloat16",
                         param_dtype="bfloat16")
  params = init_params(config, 0)
  cache = init_cache(config, batch, 512, all_heads=True)
  cache["end"] = jnp.full((batch,), 256, jnp.int32)
  tokens = jnp.zeros((batch, N), jnp.int32)
  step = jax.jit(functools.partial(forward_cached, config, all_heads=True))
  return _median_ms(lambda: step(params, cache, tokens), (), repeats)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--model-step", action=argparse.BooleanOptionalAction,
                      default=None, help="also time the model's forward "
                      "(default: only on an accelerator)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  interpret = device.platform == "cpu"
  backend = {"tpu": "tpu", "cpu": "triton"}.get(device.platform, "triton")
  static = ("blur", "otsu", "greedy")
  # Backend and interpret mode left to the kernel: chosen when lowering.
  pallas = jax.jit(functools.partial(threshold_and_draw, kernel="pallas"),
                   static_argnames=static)
  reference = jax.jit(functools.partial(threshold_and_draw,
                                        kernel="reference"),
                      static_argnames=static)
  model_step = (args.model_step if args.model_step is not None
                else device.platform != "cpu")
  out = {
      "device": f"{device.platform}: {device.device_kind}",
      "host": platform.node(),
      "jax": jax.__version__,
      "k": K, "n": N, "eps_b": 0.5,
      "pallas_backend": backend,
      "pallas_mode": "interpret" if interpret else "compiled",
      "repeats": args.repeats,
      "batches": {},
  }
  if interpret:
    out["note"] = ("interpret mode on CPU: correctness only, not a speed "
                   "figure; the >= 1.5x and <= 5% targets need a GPU/TPU")
  for batch in args.batches:
    inputs = _inputs(batch)
    got, want = pallas(*inputs), reference(*inputs)
    same = bool(np.array_equal(got.m_B, want.m_B) and
                np.array_equal(got.tokens_BxN, want.tokens_BxN))
    kernel_ms = _median_ms(pallas, inputs, args.repeats)
    reference_ms = _median_ms(reference, inputs, args.repeats)
    row = {"kernel_ms": round(kernel_ms, 3),
           "reference_ms": round(reference_ms, 3),
           "speedup": round(reference_ms / kernel_ms, 3),
           "same_m_and_tokens": same,
           "m_mean": float(np.mean(np.asarray(want.m_B)))}
    if model_step:
      step_ms = _model_step_ms(batch, args.repeats)
      row["forward_ms"] = round(step_ms, 3)
      row["kernel_share_of_step"] = round(kernel_ms / (step_ms + kernel_ms),
                                          4)
    out["batches"][str(batch)] = row
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
