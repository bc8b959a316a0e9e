"""DynaMo decoding (the paper's Algorithm 1) with KV caches, fully jitted.

One pass feeds the tokens the previous pass emitted (m per row, padded to n
with a validity length: static shapes), runs the stem, head 1 and every head
layer with their caches, takes all heads' logits at each row's last valid
position, and samples 1..n new tokens per row with `dynamo_sample`. Rows
emit their own m, so batched decoding advances each row independently.

Keys: each row has its own key (from its seed); pass p uses
fold_in(row_key, p). A row's tokens therefore do not depend on the rest of
the batch, and with eps_b = 1 (always m = 1) the draws are exactly those of
plain AR decoding with the same seeds.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamo_jax.decoding.ar import not_done, pass_keys
from dynamo_jax.decoding.dynamo_sampler import SampleResult, dynamo_sample
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import KVCache, Params, forward_cached, init_cache


class SamplerSettings(NamedTuple):
  """A DynaMo step's switches: Algorithm 1's, the kernel choice, and how the
  heads are unembedded. Static under jit (part of the compiled program);
  temperature, eps_b and repetition_penalty are traced arguments instead.

  exact_head1: True (default) unembeds head 1 with its own matmul, the same
  as the base model's, so eps_b = 1 reproduces plain AR bit for bit; heads
  2..n share a second one, and embed_out is read twice per step. False uses
  one matmul for all heads (embed_out read once: ~20% of the model part at
  pythia-70m's shape on CPU, experiments/bench_step.py); head 1's logits
  then differ from AR's by rounding (~1e-6), which can flip a rare
  near-tied draw. With the native CPU matmul (`cpu_matmul.pack_params`) a
  row's logits do not depend on the rows unembedded with it, so there one
  matmul serves every head and head 1 is exact either way.
  """
  k: int = 50
  alpha: float = 1.0
  use_cooc: bool = True
  blur: bool = True
  otsu: bool = True
  greedy: bool = False
  kernel: str = "reference"  # or "pallas" (dynamo_jax/kernels)
  exact_head1: bool = True


def sample_with_settings(keys_Bx2, logits_BxNxV, history_BxHs, history_len_B,
                         cooc, *, n: int, temperature, eps_b,
                         repetition_penalty,
                         settings: SamplerSettings) -> SampleResult:
  """`dynamo_sample` with Algorithm 1's switches and the kernel taken from
  `settings` (exact_head1 concerns the model part, not the sampler)."""
  return dynamo_sample(
      keys_Bx2, logits_BxNxV, history_BxHs, history_len_B, cooc, n=n,
      k=settings.k, temperature=temperature, eps_b=eps_b,
      alpha=settings.alpha, use_cooc=settings.use_cooc, blur=settings.blur,
      otsu=settings.otsu, repetition_penalty=repetition_penalty,
      greedy=settings.greedy, kernel=settings.kernel)


def decode_step(config: PythiaConfig, params: Params, cache: KVCache,
                tokens_BxT, lengths_B, keys_Bx2, history_BxHs, history_len_B,
                cooc=None, *, temperature=0.7, eps_b=0.5,
                repetition_penalty=1.1,
                settings: SamplerSettings = SamplerSettings()
                ) -> tuple[SampleResult, KVCache]:
  """One DynaMo pass: feed tokens, sample 1..n next tokens per row. Pure.

  Args:
    config, params: a DynaMo-Tn model (n = config.num_token_heads).
    cache: from `init_cache(config, B, S, all_heads=True)`; needs
      end + T <= S. Donate it under jit to update in place.
    tokens_BxT: int32 [B, T], the tokens to feed (the prompt at prefill,
      then the previous pass's `tokens_BxN` with T = n).
    lengths_B: int32 [B], valid tokens per row (the previous m; 0 for a row
      that should not advance).
    keys_Bx2: uint32 [B, 2], one PRNG key per row for this pass.
    history_BxHs, history_len_B: tokens generated so far, for the repetition
      penalty (first history_len_B valid per row).
    cooc: None (no co-occurrence weighting) or a table with grid_weights.
  Returns:
    (SampleResult: m_B int32 [B] in 1..n, tokens_BxN int32 [B, n] with the
    first m valid, ...; the new cache, advanced by lengths_B).
  """
  # Only each row's last valid position is unembedded (for every head).
  logits_NxBx1xV, cache = forward_cached(config, params, cache, tokens_BxT,
                                         lengths_B, all_heads=True,
                                         last_only=True,
                                         exact_head1=settings.exact_head1)
  result = sample_with_settings(
      keys_Bx2, jnp.swapaxes(logits_NxBx1xV[:, :, 0], 0, 1), history_BxHs,
      history_len_B, cooc, n=config.num_token_heads, temperature=temperature,
      eps_b=eps_b, repetition_penalty=repetition_penalty, settings=settings)
  return result, cache


def write_rows(out_BxG, chunk_BxN, at_B):
  """Writes each row's chunk at that row's offset."""
  return jax.vmap(lambda o, c, a: jax.lax.dynamic_update_slice(o, c, (a,)))(
      out_BxG, chunk_BxN, at_B)


class DynamoState(NamedTuple):
  """The carry of DynaMo decoding between passes (a pytree; donate it).

  out_BxG: int32 [B, max_new_tokens + n], tokens emitted so far per row
    (the first count_B valid; a row's last pass may run past
    max_new_tokens).
  count_B: int32 [B], tokens emitted so far per row.
  passes: int32 [], forward passes so far (prefill included).
  fed_BxN, fed_len_B: the last pass's tokens and m, fed to the next pass.
  accepted_BxNp: int32 [B, max_new_tokens], m per pass (0 once a row is
    done; columns past `passes` are 0).
  """
  cache: KVCache
  out_BxG: jax.Array
  count_B: jax.Array
  passes: jax.Array
  fed_BxN: jax.Array
  fed_len_B: jax.Array
  accepted_BxNp: jax.Array


def dynamo_init(config: PythiaConfig, params: Params, prompt_BxP,
                row_keys_Bx2, cooc, temperature, eps_b, repetition_penalty,
                *, max_new_tokens: int,
                settings: SamplerSettings) -> DynamoState:
  """The prefill pass: feeds the prompt [B, P] into a fresh cache and emits
  each row's first 1..n tokens with pass key 0. Pure; `generate_dynamo` is
  this, then `dynamo_body` while `not_done`."""
  b, p = prompt_BxP.shape
  n = config.num_token_heads
  cache = init_cache(config, b, p + max_new_tokens + n, all_heads=True)
  out_BxG = jnp.zeros((b, max_new_tokens + n), jnp.int32)
  count_B = jnp.zeros((b,), jnp.int32)
  res, cache = decode_step(
      config, params, cache, prompt_BxP, jnp.full((b,), p, jnp.int32),
      pass_keys(row_keys_Bx2, 0), out_BxG, count_B, cooc,
      temperature=temperature, eps_b=eps_b,
      repetition_penalty=repetition_penalty, settings=settings)
  out_BxG = write_rows(out_BxG, res.tokens_BxN, count_B)
  accepted_BxNp = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(
      res.m_B)
  return DynamoState(cache=cache, out_BxG=out_BxG, count_B=res.m_B,
                     passes=jnp.int32(1), fed_BxN=res.tokens_BxN,
                     fed_len_B=res.m_B, accepted_BxNp=accepted_BxNp)


def _either(one, feed, n: int, cache):
  """feed(1)(cache) if `one` else feed(n)(cache): (logits, cache).

  As two while loops of 0 or 1 iterations rather than a lax.cond: XLA
  updates a while loop's carry in place, but copies a cache that goes
  through a conditional twice (into the branch and out of it), every layer's
  keys and values, every pass.
  """
  def run(width, go):
    def body(carry):
      _, cache, _ = carry
      logits, cache = feed(width)(cache)
      return logits, cache, jnp.bool_(False)
    logits = jax.eval_shape(feed(width), cache)[0]
    init = (jnp.zeros(logits.shape, logits.dtype), cache, go)
    return jax.lax.while_loop(lambda carry: carry[2], body, init)[:2]

  logits_one, cache = run(1, one)
  logits_n, cache = run(n, ~one)
  return jnp.where(one, logits_one, logits_n), cache


def dynamo_body(config: PythiaConfig, params: Params, state: DynamoState,
                row_keys_Bx2, cooc, temperature, eps_b, repetition_penalty,
                *, max_new_tokens: int,
                settings: SamplerSettings) -> DynamoState:
  """One pass after the prefill, with pass key `state.passes`: feeds the
  last emitted tokens and appends 1..n new ones to every row that still
  needs tokens (done rows emit 0). Pure."""
  n = config.num_token_heads

  def feed(width):
    return lambda cache: forward_cached(
        config, params, cache, state.fed_BxN[:, :width],
        state.fed_len_B, all_heads=True, last_only=True,
        exact_head1=settings.exact_head1)

  # The chunk is padded to n. In float32, when no row emitted more than one
  # token last pass (always at eps_b = 1, most passes at a high eps_b), a
  # branch (`_either`) feeds just that one: on XLA:CPU, where float32
  # matmuls are compute-bound at this size, that saves ~9% of the embedded
  # model's pass. Not with 16-bit compute or weights: XLA:CPU computes bf16
  # matmuls on float32 copies of the weights (and a float32 model casts
  # 16-bit ones), converted once outside the decode loop but again in every
  # pass inside a lax.cond's branches (pythia-160m shape, bf16, eps_b 1:
  # pass price 1.62 with the cond, 1.26 without; bench_pass_price.py; not
  # re-measured with `_either`); and a memory-bound accelerator reads the
  # same weights for n rows as for one.
  if (jnp.dtype(config.dtype) == jnp.float32
      and jnp.dtype(config.param_dtype) == jnp.float32):
    logits_NxBx1xV, cache = _either(jnp.all(state.fed_len_B <= 1), feed, n,
                                    state.cache)
  else:
    logits_NxBx1xV, cache = feed(n)(state.cache)
  res = sample_with_settings(
      pass_keys(row_keys_Bx2, state.passes),
      jnp.swapaxes(logits_NxBx1xV[:, :, 0], 0, 1), state.out_BxG,
      state.count_B, cooc, n=n, temperature=temperature, eps_b=eps_b,
      repetition_penalty=repetition_penalty, settings=settings)
  active_B = state.count_B < max_new_tokens
  m_B = jnp.where(active_B, res.m_B, 0)
  out_BxG = jnp.where(active_B[:, None],
                      write_rows(state.out_BxG, res.tokens_BxN, state.count_B),
                      state.out_BxG)
  accepted_BxNp = state.accepted_BxNp.at[:, state.passes].set(m_B)
  return DynamoState(cache=cache, out_BxG=out_BxG,
                     count_B=state.count_B + m_B, passes=state.passes + 1,
                     fed_BxN=res.tokens_BxN, fed_len_B=m_B,
                     accepted_BxNp=accepted_BxNp)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens",
                                              "settings"))
def generate_dynamo(config: PythiaConfig, params: Params, prompt_BxP,
                    row_keys_Bx2, cooc, temperature, eps_b, repetition_penalty,
                    *, max_new_tokens: int, settings: SamplerSettings):
  """(tokens int32 [B, max_new_tokens], accepted int32 [B, max_new_tokens]
  (m per pass, 0 once a row is done; columns past `passes` are 0), passes)."""
  args = (row_keys_Bx2, cooc, temperature, eps_b, repetition_penalty)
  static = dict(max_new_tokens=max_new_tokens, settings=settings)
  state = dynamo_init(config, params, prompt_BxP, *args, **static)
  state = jax.lax.while_loop(
      functools.partial(not_done, max_new_tokens=max_new_tokens),
      lambda s: dynamo_body(config, params, s, *args, **static), state)
  return (state.out_BxG[:, :max_new_tokens], state.accepted_BxNp,
          state.passes)
