"""The price of a decoding pass, per mode, over an AR pass.

A mode's pass price is its wall-clock per forward pass over AR's:
(seconds / passes of `generate(mode...)`) / (seconds / passes of
`generate(mode="ar")`), the same prompts, seeds and new tokens, batch 1,
calls interleaved (AR, then each mode, repeated) so that drift on a shared
machine hits all modes alike; medians over the repeats, compile excluded.
Speed-up = tokens per pass / pass price, which is how a measured speed-up
decomposes and how `bench --project-shape` projects one.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from dynamo_jax.decoding.generate import generate

# The modes a benchmark compares, as `generate` keyword arguments (the
# caller adds eps_b, tree, cooc).
AR = {"mode": "ar"}


def timed_modes(config, params, prompts, modes: Mapping[str, dict], *,
                new_tokens: int, repeats: int, temperature: float = 0.7
                ) -> dict[str, dict]:
  """For each named mode (plus "ar"): median seconds of decoding every
  prompt at batch 1 (row i with seed [i]), its range over the repeats, the
  forward passes those calls made, tokens per pass, and the pass price over
  AR's. prompts: int [R, P]."""
  modes = {"ar": AR, **{k: v for k, v in modes.items() if k != "ar"}}
  prompts = np.asarray(prompts, np.int32)

  def run(kw):
    passes = 0
    for i, prompt in enumerate(prompts):
      out = generate(config, params, prompt[None], max_new_tokens=new_tokens,
                     temperature=temperature, seed=[i], **kw)
      passes += out.forward_passes
    # Tokens asked for, not emitted: a last pass may emit past the end.
    return passes, new_tokens * len(prompts)

  counts = {name: run(kw) for name, kw in modes.items()}  # compiles
  times = {name: [] for name in modes}
  for _ in range(repeats):
    for name, kw in modes.items():
      start = time.perf_counter()
      run(kw)
      times[name].append(time.perf_counter() - start)
  out = {}
  for name in modes:
    passes, tokens = counts[name]
    seconds = float(np.median(times[name]))
    out[name] = {"seconds": seconds,
                 "seconds_range": [min(times[name]), max(times[name])],
                 "passes": passes, "tokens_per_pass": tokens / passes,
                 "per_pass_ms": 1e3 * seconds / passes}
  ar_pass = out["ar"]["per_pass_ms"]
  for name, row in out.items():
    row["pass_price"] = row["per_pass_ms"] / ar_pass
    row["speedup_vs_ar"] = out["ar"]["seconds"] / row["seconds"]
  return out


def projection(shape: str, tokens_per_pass: Mapping[str, float],
               modes: Mapping[str, dict], *, new_tokens: int = 16,
               repeats: int = 3, prompt_len: int = 16, seed: int = 0,
               matmul: str = "xla") -> dict:
  """A PROJECTION: the speed-up the measured tokens per pass would give at a
  suite shape (`dynamo-1.5b-t3`, ...), from pass prices measured here on
  RANDOM weights of that shape: bf16 with XLA's matmuls, or float32 packed
  for the native CPU matmul (`matmul="native"`). Random heads are rarely
  accepted, so each mode's price is per pass, not per token; DynaMo runs
  without a table there (the measured model's table has another
  vocabulary)."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.model.config import dynamo_preset
  from dynamo_jax.model.pythia import init_params
  dtype = "float32" if matmul == "native" else "bfloat16"
  config = dynamo_preset(shape, dtype=dtype, param_dtype=dtype)
  params = init_params(config, seed)
  if matmul == "native":
    from dynamo_jax.kernels import cpu_matmul
    config, params = cpu_matmul.pack_params(config, params)
  prompt = np.random.default_rng(seed).integers(
      1, config.vocab_size, size=(1, prompt_len)).astype(np.int32)
  untabled = {k: {kk: vv for kk, vv in kw.items() if kk != "cooc"}
              for k, kw in modes.items()}
  prices = timed_modes(config, params, prompt, untabled,
                       new_tokens=new_tokens, repeats=repeats)
  rows = {}
  for name, tpp in tokens_per_pass.items():
    price = prices[name]["pass_price"]
    rows[name] = {"tokens_per_pass": tpp, "pass_price": price,
                  "projected_speedup": tpp / price,
                  "per_pass_ms": prices[name]["per_pass_ms"]}
  return {"kind": "projection", "shape": shape, "dtype": dtype,
          "matmul": matmul,
          "note": ("projected_speedup = tokens_per_pass (measured on the "
                   "benchmarked model) / pass_price (measured on random "
                   f"{dtype} weights of {shape} on this device, batch 1, "
                   f"{matmul} matmuls): a projection, not a measurement of "
                   "a trained model"),
          "modes": rows}
