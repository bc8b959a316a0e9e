"""Wall-clock timing of decoding, compile excluded: `median_seconds` of a
call, `measure` of a compiled pass with its KV cache threaded through, and
the split of one DynaMo pass between the model (forward with every head, KV
caches) and the sampler (Algorithm 1)."""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.cooc import lookup
from dynamo_jax.cooc.table import CoocTable
from dynamo_jax.decoding.ar import pass_keys
from dynamo_jax.decoding.dynamo import (SamplerSettings, decode_step,
                                        sample_with_settings)
from dynamo_jax.decoding.sampling import row_keys
from dynamo_jax.evaluation.passes import ar_params
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, forward_cached, init_cache


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of fn() over `repeats` runs after one untimed warm-up
  run (which compiles). fn must block until its result is ready."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _stats_ms(seconds: list[float], pipelined_s: float) -> dict:
  ms = np.asarray(seconds) * 1e3
  return {"median": round(float(np.median(ms)), 4),
          "p10": round(float(np.percentile(ms, 10)), 4),
          "pipelined": round(pipelined_s * 1e3, 4),
          "calls": len(seconds)}


def measure(call, cache, make_end, repeats: int):
  """Times call(cache) -> (out, cache) of a compiled, cache-donating pass.

  The cache is threaded, with a fresh `end` (made before the timer starts)
  put in before every call; `cache` None: a call without cache. One untimed
  call first, then `median`/`p10` (ms) over `repeats` calls, each
  dispatched and blocked on alone (host dispatch included, as a Python
  decode loop pays it), and `pipelined`: `repeats` calls back to back, one
  block at the end, total / repeats (dispatch overlaps device work, as in a
  jitted decode loop). Returns (stats, last out, last cache).
  """
  def with_end(cache, end):
    return cache if cache is None else {**cache, "end": end}

  out, cache = call(with_end(cache, make_end()))  # warm-up (runtime, allocs)
  jax.block_until_ready(out)
  gc.collect()
  gc.disable()
  try:
    times = []
    for _ in range(repeats):
      end = make_end()
      jax.block_until_ready(end)
      start = time.perf_counter()
      out, cache = call(with_end(cache, end))
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    ends = [make_end() for _ in range(repeats)]
    jax.block_until_ready(ends)
    start = time.perf_counter()
    for end in ends:
      out, cache = call(with_end(cache, end))
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - start) / repeats
  finally:
    gc.enable()
  return _stats_ms(times, pipelined), out, cache


def _block(x):
  return jax.tree.map(lambda a: a.block_until_ready(), x)


def step_split(config: PythiaConfig, params: Params, prompt_1xP, cooc, *,
               eps_b: float, temperature: float, settings: SamplerSettings,
               repeats: int = 20) -> dict[str, float]:
  """Median milliseconds of one DynaMo pass (batch 1, n tokens fed after a
  prefill of the prompt) and of its two parts, each jitted on its own:
  `model_ms` (forward_cached with all heads), `sampler_ms` (dynamo_sample
  on those logits), `step_ms` (decode_step, both in one program)."""
  n = config.num_token_heads
  prompt = jnp.asarray(prompt_1xP, jnp.int32)
  p = prompt.shape[1]
  cache = init_cache(config, 1, p + 4 * n, all_heads=True)
  _, cache = jax.jit(functools.partial(forward_cached, config, all_heads=True))(
      params, cache, prompt)
  tokens = prompt[:, -n:]
  lengths = jnp.full((1,), n, jnp.int32)
  keys = pass_keys(row_keys(0, 1), 1)
  history = jnp.zeros((1, 4 * n), jnp.int32)
  history_len = jnp.zeros((1,), jnp.int32)
  if isinstance(cooc, CoocTable):  # its arrays on device, as generate does
    cooc = lookup.device_table(cooc)

  # The model part of decode_step: every head at each row's last position.
  model = jax.jit(lambda params, cache: jnp.swapaxes(forward_cached(
      config, params, cache, tokens, lengths, all_heads=True,
      last_only=True)[0][:, :, 0], 0, 1))
  sampler = jax.jit(lambda logits, cooc: sample_with_settings(
      keys, logits, history, history_len, cooc, n=n, temperature=temperature,
      eps_b=eps_b, repetition_penalty=1.1,  # decode_step's default
      settings=settings))
  step = jax.jit(lambda params, cache, cooc: decode_step(
      config, params, cache, tokens, lengths, keys, history, history_len, cooc,
      temperature=temperature, eps_b=eps_b, settings=settings))
  logits = _block(model(params, cache))
  out = {
      "model_ms": median_seconds(lambda: _block(model(params, cache)), repeats),
      "sampler_ms": median_seconds(lambda: _block(sampler(logits, cooc)),
                                   repeats),
      "step_ms": median_seconds(lambda: _block(step(params, cache, cooc)),
                                repeats),
  }
  out = {k: v * 1e3 for k, v in out.items()}
  out["sampler_share"] = out["sampler_ms"] / (out["model_ms"] + out["sampler_ms"])
  return out


def ar_pass_ms(config: PythiaConfig, params: Params, prompt_1xP, *,
               repeats: int = 20) -> float:
  """Median milliseconds of one plain AR pass (head 1 only, one token)."""
  base = config.replace(num_token_heads=1)
  params = ar_params(params)
  prompt = jnp.asarray(prompt_1xP, jnp.int32)
  cache = init_cache(base, 1, prompt.shape[1] + 4)
  fwd = jax.jit(functools.partial(forward_cached, base))
  _, cache = fwd(params, cache, prompt)
  token = prompt[:, -1:]
  return 1e3 * median_seconds(lambda: _block(fwd(params, cache, token)),
                              repeats)
