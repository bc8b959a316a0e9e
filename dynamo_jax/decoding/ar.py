"""Plain autoregressive decoding with a KV cache, fully jitted.

Prefill (`ar_init`) writes the prompt into the cache and samples the first
new token; a `lax.scan` of `ar_body` then feeds one token per forward pass.
Every pass emits exactly one token, so `accepted` is all ones and
`forward_passes == max_new_tokens`. `ar_init` and `ar_body` also run one pass
per call, for streaming (dynamo_jax/chat/stream.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamo_jax.decoding.sampling import sample_tokens
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import (KVCache, Params, forward_cached,
                                     init_cache)


def pass_keys(row_keys_Bx2, pass_index):
  """The per-row keys of one forward pass."""
  return jax.vmap(lambda key: jax.random.fold_in(key, pass_index))(row_keys_Bx2)


def not_done(state, max_new_tokens: int):
  """The decode loops' condition on a state with count_B and passes: some
  row still short of max_new_tokens, passes left."""
  return (jnp.any(state.count_B < max_new_tokens)
          & (state.passes < max_new_tokens))


def ar_pass(config: PythiaConfig, params: Params, cache: KVCache, tokens_Bx1,
            row_keys_Bx2, pass_index, temperature, *, greedy: bool):
  """One AR pass after the prefill: feed tokens_Bx1, draw each row's next
  token from head 1 with fold_in(row key, pass_index). Returns (int32 [B],
  the new cache). Pure: `ar_body`'s pass (generate_ar's scan body); jit
  it with `donate_argnums=2` to run (or time) one pass alone."""
  logits_Bx1xV, cache = forward_cached(config, params, cache, tokens_Bx1)
  next_B = sample_tokens(pass_keys(row_keys_Bx2, pass_index),
                         logits_Bx1xV[:, 0], greedy=greedy,
                         temperature=temperature)
  return next_B, cache


# The importable cached step: (config, params, cache, tokens_BxT, lengths_B)
# -> (logits_BxTxV, cache), with the cache donated (updated in place).
ar_step = jax.jit(forward_cached, static_argnums=0, donate_argnums=2)


class ARState(NamedTuple):
  """The carry of AR decoding between passes (a pytree; donate it). Its
  out_BxG / count_B / passes are `DynamoState`'s with n = 1.

  out_BxG: int32 [B, max_new_tokens + 1], tokens emitted so far (the first
    count_B valid per row; every row has the same count).
  count_B: int32 [B]; passes: int32 [], prefill included (= count_B).
  """
  cache: KVCache
  out_BxG: jax.Array
  count_B: jax.Array
  passes: jax.Array


def ar_init(config: PythiaConfig, params: Params, prompt_BxP, row_keys_Bx2,
            temperature, *, max_new_tokens: int, greedy: bool) -> ARState:
  """The prefill: the prompt [B, P] into a fresh cache, the first token of
  each row drawn with pass key 0. Pure."""
  b, p = prompt_BxP.shape
  cache = init_cache(config, b, p + max_new_tokens)
  # Prefill unembeds only the last prompt position, as DynaMo's does.
  logits_Bx1xV, cache = forward_cached(config, params, cache, prompt_BxP,
                                       last_only=True)
  first_B = sample_tokens(pass_keys(row_keys_Bx2, 0), logits_Bx1xV[:, 0],
                          greedy=greedy, temperature=temperature)
  out_BxG = jnp.zeros((b, max_new_tokens + 1), jnp.int32).at[:, 0].set(first_B)
  return ARState(cache=cache, out_BxG=out_BxG,
                 count_B=jnp.ones((b,), jnp.int32), passes=jnp.int32(1))


def ar_body(config: PythiaConfig, params: Params, state: ARState,
            row_keys_Bx2, temperature, *, greedy: bool) -> ARState:
  """One `ar_pass` with pass key `state.passes`, feeding the last token.
  Pure. Run it while `not_done` (max_new_tokens - 1 times after `ar_init`):
  the cache holds P + max_new_tokens positions."""
  last_B = state.out_BxG[:, state.passes - 1]
  next_B, cache = ar_pass(config, params, state.cache, last_B[:, None],
                          row_keys_Bx2, state.passes, temperature,
                          greedy=greedy)
  return ARState(cache=cache,
                 out_BxG=state.out_BxG.at[:, state.passes].set(next_B),
                 count_B=state.count_B + 1, passes=state.passes + 1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def generate_ar(config: PythiaConfig, params: Params, prompt_BxP: jax.Array,
                row_keys_Bx2: jax.Array, temperature: jax.Array, *,
                max_new_tokens: int, greedy: bool) -> jax.Array:
  """New tokens int32 [B, max_new_tokens] after the prompt [B, P].

  Pass i samples row b with fold_in(row_keys_Bx2[b], i), as DynaMo decoding
  does, so DynaMo with eps_b = 1 reproduces these tokens exactly.
  """
  state = ar_init(config, params, prompt_BxP, row_keys_Bx2, temperature,
                  max_new_tokens=max_new_tokens, greedy=greedy)
  state, _ = jax.lax.scan(
      lambda s, _: (ar_body(config, params, s, row_keys_Bx2, temperature,
                            greedy=greedy), None),
      state, None, length=max_new_tokens - 1)
  return state.out_BxG[:, :max_new_tokens]
