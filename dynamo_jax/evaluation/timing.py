"""Wall-clock timing of decoding, compile excluded, and the split of one
DynaMo pass between the model (forward with every head, KV caches) and the
sampler (Algorithm 1)."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from dynamo_jax.decoding.ar import pass_keys
from dynamo_jax.decoding.dynamo import SamplerSettings, decode_step
from dynamo_jax.decoding.dynamo_sampler import dynamo_sample
from dynamo_jax.decoding.sampling import row_keys
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
  sample_kwargs = dict(n=n, k=settings.k, alpha=settings.alpha,
                       use_cooc=settings.use_cooc, blur=settings.blur,
                       otsu=settings.otsu, greedy=settings.greedy)

  # The model part of decode_step: every head at each row's last position.
  model = jax.jit(lambda params, cache: jnp.swapaxes(forward_cached(
      config, params, cache, tokens, lengths, all_heads=True,
      last_only=True)[0][:, :, 0], 0, 1))
  sampler = jax.jit(lambda logits, cooc: dynamo_sample(
      keys, logits, history, history_len, cooc, temperature=temperature,
      eps_b=eps_b, **sample_kwargs))
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
  params = {k: v for k, v in params.items() if not k.startswith("heads_")}
  prompt = jnp.asarray(prompt_1xP, jnp.int32)
  cache = init_cache(base, 1, prompt.shape[1] + 4)
  fwd = jax.jit(functools.partial(forward_cached, base))
  _, cache = fwd(params, cache, prompt)
  token = prompt[:, -1:]
  return 1e3 * median_seconds(lambda: _block(fwd(params, cache, token)),
                              repeats)
