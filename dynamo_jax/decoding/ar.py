"""Plain autoregressive decoding with a KV cache, fully jitted.

Prefill writes the prompt into the cache and samples the first new token; a
`lax.scan` then feeds one token per forward pass. Every pass emits exactly one
token, so `accepted` is all ones and `forward_passes == max_new_tokens`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynamo_jax.decoding.sampling import sample_tokens
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import (KVCache, Params, forward_cached,
                                     init_cache)


def pass_keys(row_keys_Bx2, pass_index):
  """The per-row keys of one forward pass."""
  return jax.vmap(lambda key: jax.random.fold_in(key, pass_index))(row_keys_Bx2)


def ar_pass(config: PythiaConfig, params: Params, cache: KVCache, tokens_Bx1,
            row_keys_Bx2, pass_index, temperature, *, greedy: bool):
  """One AR pass after the prefill: feed tokens_Bx1, draw each row's next
  token from head 1 with fold_in(row key, pass_index). Returns (int32 [B],
  the new cache). Pure: `generate_ar`'s scan body; jit it with
  `donate_argnums=2` to run (or time) one pass alone."""
  logits_Bx1xV, cache = forward_cached(config, params, cache, tokens_Bx1)
  next_B = sample_tokens(pass_keys(row_keys_Bx2, pass_index),
                         logits_Bx1xV[:, 0], greedy=greedy,
                         temperature=temperature)
  return next_B, cache


# The importable cached step: (config, params, cache, tokens_BxT, lengths_B)
# -> (logits_BxTxV, cache), with the cache donated (updated in place).
ar_step = jax.jit(forward_cached, static_argnums=0, donate_argnums=2)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def generate_ar(config: PythiaConfig, params: Params, prompt_BxP: jax.Array,
                row_keys_Bx2: jax.Array, temperature: jax.Array, *,
                max_new_tokens: int, greedy: bool) -> jax.Array:
  """New tokens int32 [B, max_new_tokens] after the prompt [B, P].

  Pass i samples row b with fold_in(row_keys_Bx2[b], i), as DynaMo decoding
  does, so DynaMo with eps_b = 1 reproduces these tokens exactly.
  """
  b, p = prompt_BxP.shape
  cache = init_cache(config, b, p + max_new_tokens)
  # Prefill unembeds only the last prompt position, as DynaMo's does.
  logits_Bx1xV, cache = forward_cached(config, params, cache, prompt_BxP,
                                       last_only=True)
  first_B = sample_tokens(pass_keys(row_keys_Bx2, 0), logits_Bx1xV[:, 0],
                          greedy=greedy, temperature=temperature)

  def step(carry, i):
    cache, tok_B = carry
    nxt_B, cache = ar_pass(config, params, cache, tok_B[:, None], row_keys_Bx2,
                           i, temperature, greedy=greedy)
    return (cache, nxt_B), tok_B

  (_, last_B), toks_NxB = jax.lax.scan(
      step, (cache, first_B), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([toks_NxB.T, last_B[:, None]], axis=1)
