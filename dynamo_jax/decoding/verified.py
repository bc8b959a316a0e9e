"""Verified (lossless) multi-token decoding, beyond the paper.

Heads 2..n propose the tokens after head 1's; the next pass checks them with
head 1 (self-speculative / blockwise parallel decoding):

  pass: feed [x, d_1 .. d_{n-1}]  (x decided by head 1, d_i drafted by head
        i+1 in the previous pass); head 1's distributions p_0 .. p_{n-1} at
        those positions verify the drafts in order:
          greedy:   accept d_i iff d_i == argmax p_{i-1};
          sampling: accept d_i with prob min(1, p_{i-1}(d_i) / q_i(d_i)),
                    where q_i is the draft's own distribution.
        With j drafts accepted, the next token x' is argmax p_j (greedy), a
        draw from max(0, p_j - q_{j+1}) renormalised (a rejection), or a draw
        from p_{n-1} (all accepted). Emitted: d_1..d_j, x' (j + 1 tokens);
        the cache keeps x, d_1..d_j; heads 2..n at position j draft anew.

Greedy output therefore equals plain AR greedy token for token, and sampled
output has exactly the distribution of AR sampling from head 1 at the same
temperature (standard speculative-sampling acceptance; a draft may come from
any proposal fixed before the check, such as head i's marginal here).

Shapes (dynamo_jax.model.config): Nd = n - 1 drafted tokens, G new tokens,
Np forward passes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamo_jax.decoding.ar import not_done, pass_keys  # noqa: F401 (re-exported)
from dynamo_jax.decoding.dynamo import write_rows
from dynamo_jax.decoding.sampling import draw_from_probs
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import (KVCache, Params, forward_cached,
                                     init_cache, unembed)


def _sub(keys_B, i):
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)


def propose_drafts(logits_BxNxV, keys_B, temperature, greedy, first: int = 0):
  """Tokens from heads first+1..n (x from head 1, then drafts d_1..d_{n-1}
  from heads 2..n) and their distributions [B, heads, V]; logits_BxNxV
  holds those heads only. Head i always draws with key 100 + i - 1."""
  probs_BxNxV = jax.nn.softmax(logits_BxNxV / temperature, axis=-1)
  if greedy:
    tokens_BxN = jnp.argmax(logits_BxNxV, axis=-1).astype(jnp.int32)
  else:
    heads = logits_BxNxV.shape[1]
    tokens_BxN = jnp.stack(
        [draw_from_probs(_sub(keys_B, 100 + first + i), probs_BxNxV[:, i])
         for i in range(heads)], axis=1)
  return tokens_BxN, probs_BxNxV


def _verify(p_BxNxV, drafts_BxNd, q_BxNdxV, keys_B, greedy):
  """(j accepted drafts [B], next token x' [B])."""
  b, n, _ = p_BxNxV.shape
  rows = jnp.arange(b)
  if greedy:
    best_BxN = jnp.argmax(p_BxNxV, axis=-1).astype(jnp.int32)
    ok_BxNd = drafts_BxNd == best_BxN[:, :-1]
  else:
    p_d_BxNd = jnp.take_along_axis(p_BxNxV[:, :-1], drafts_BxNd[..., None],
                                   -1)[..., 0]
    q_d_BxNd = jnp.take_along_axis(q_BxNdxV, drafts_BxNd[..., None], -1)[..., 0]
    u_BxNd = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1),
                                                  (n - 1,)))(keys_B)
    ok_BxNd = u_BxNd * q_d_BxNd < p_d_BxNd  # u < p/q, without dividing by 0
  j_B = jnp.sum(jnp.cumprod(ok_BxNd.astype(jnp.int32), axis=1), axis=1)
  if greedy:
    return j_B, best_BxN[rows, j_B]
  p_j_BxV = p_BxNxV[rows, j_B]
  q_next_BxV = jnp.concatenate(
      [q_BxNdxV, jnp.zeros_like(q_BxNdxV[:, :1])], axis=1)[rows, j_B]
  # q_next = 0 when every draft passed: the residual is then p itself.
  return j_B, draw_from_probs(_sub(keys_B, 2), residual(p_j_BxV, q_next_BxV))


def residual(p_BxV, q_BxV):
  """The law a rejected draft is replaced from: max(0, p - q) renormalised;
  p itself where nothing is left (p == q exactly, when any draw from p is
  exact)."""
  residual_BxV = jnp.maximum(p_BxV - q_BxV, 0.0)
  total_Bx1 = jnp.sum(residual_BxV, axis=-1, keepdims=True)
  return jnp.where(total_Bx1 > 0,
                   residual_BxV / jnp.maximum(total_Bx1, 1e-30), p_BxV)


class VerifiedState(NamedTuple):
  """The chain's decode loop carry (a pytree): `verified_body` maps it to the
  next pass's. out_BxG holds each row's emitted tokens, count_B how many."""
  cache: KVCache
  out_BxG: jax.Array         # int32 [B, max_new_tokens + n]
  count_B: jax.Array         # int32 [B]
  x_B: jax.Array             # int32 [B], head 1's token, fed first next pass
  d_BxNd: jax.Array          # int32 [B, Nd], the drafts fed after it
  q_BxNdxV: jax.Array        # float32 [B, Nd, V], the drafts' distributions
  accepted_BxNp: jax.Array   # int32 [B, max_new_tokens], tokens per pass
  passes: jax.Array          # int32 [], forward passes so far


def verified_init(config: PythiaConfig, params: Params, prompt_BxP,
                  row_keys_Bx2, temperature, *, max_new_tokens: int,
                  greedy: bool) -> VerifiedState:
  """Prefill: feeds the prompt, emits head 1's token, drafts the next n-1."""
  b, p = prompt_BxP.shape
  n = config.num_token_heads
  cache = init_cache(config, b, p + max_new_tokens + n, all_heads=True)
  logits_NxBx1xV, cache = forward_cached(config, params, cache, prompt_BxP,
                                         all_heads=True, last_only=True)
  tokens_BxN, probs_BxNxV = propose_drafts(
      jnp.swapaxes(logits_NxBx1xV[:, :, 0], 0, 1), pass_keys(row_keys_Bx2, 0),
      temperature, greedy)
  x_B, d_BxNd, q_BxNdxV = tokens_BxN[:, 0], tokens_BxN[:, 1:], probs_BxNxV[:, 1:]
  out_BxG = jnp.zeros((b, max_new_tokens + n), jnp.int32).at[:, 0].set(x_B)
  accepted_BxNp = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(1)
  return VerifiedState(cache, out_BxG, jnp.ones((b,), jnp.int32), x_B, d_BxNd,
                       q_BxNdxV, accepted_BxNp, jnp.int32(1))


def verified_body(config: PythiaConfig, params: Params, state: VerifiedState,
                  row_keys_Bx2, temperature, *, max_new_tokens: int,
                  greedy: bool) -> VerifiedState:
  """One verifying pass: feeds [x, drafts], accepts j drafts, emits j + 1."""
  cache, out_BxG, count_B, x_B, d_BxNd, q_BxNdxV = state[:6]
  accepted_BxNp, passes = state.accepted_BxNp, state.passes
  keys_B = pass_keys(row_keys_Bx2, passes)
  chunk_BxN = jnp.concatenate([x_B[:, None], d_BxNd], axis=1)
  active_B = count_B < max_new_tokens
  end_B = cache["end"]
  hidden_NxBxNxD, cache = forward_cached(config, params, cache, chunk_BxN,
                                         all_heads=True, hidden_only=True)
  # Head 1 is unembedded at every fed position, heads 2..n only at the last
  # accepted one (below): the rest would be thrown away.
  head1_BxNxV = unembed(config, params, hidden_NxBxNxD[0])
  # Greedy verification compares argmaxes, so logits serve as well as p.
  if not greedy:
    head1_BxNxV = jax.nn.softmax(head1_BxNxV / temperature, axis=-1)
  j_B, x_next_B = _verify(head1_BxNxV, d_BxNd, q_BxNdxV, keys_B, greedy)
  # The cache keeps x and the accepted drafts; entries written for the
  # rejected ones lie past the new end and are overwritten before any
  # query can see them.
  cache = {**cache, "end": end_B + jnp.where(active_B, j_B + 1, 0)}
  # New drafts from heads 2..n at the last accepted position j.
  rows_B = jnp.arange(j_B.shape[0])
  at_j_BxNdxV = jnp.swapaxes(
      unembed(config, params, hidden_NxBxNxD[1:, rows_B, j_B]), 0, 1)
  d_new_BxNd, q_new_BxNdxV = propose_drafts(at_j_BxNdxV, _sub(keys_B, 3),
                                      temperature, greedy, first=1)
  out_BxG, count_B, accepted_BxNp = emit_accepted(
      out_BxG, count_B, accepted_BxNp, passes, d_BxNd, j_B, x_next_B,
      active_B)
  return VerifiedState(cache, out_BxG, count_B, x_next_B, d_new_BxNd,
                       q_new_BxNdxV, accepted_BxNp, passes + 1)


def emit_accepted(out_BxG, count_B, accepted_BxNp, passes, drafts_BxNd, j_B,
                  next_B, active_B):
  """Appends each active row's j accepted drafts and its next token to
  out_BxG; returns (out_BxG, count_B, accepted_BxNp) after the pass."""
  n = drafts_BxNd.shape[1] + 1
  emitted_BxN = jnp.where(jnp.arange(n)[None] < j_B[:, None],
                          jnp.pad(drafts_BxNd, ((0, 0), (0, 1))), 0)
  emitted_BxN = jnp.where(jnp.arange(n)[None] == j_B[:, None],
                          next_B[:, None], emitted_BxN)
  m_B = jnp.where(active_B, j_B + 1, 0)
  out_BxG = jnp.where(active_B[:, None],
                      write_rows(out_BxG, emitted_BxN, count_B), out_BxG)
  return out_BxG, count_B + m_B, accepted_BxNp.at[:, passes].set(m_B)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens",
                                              "greedy"))
def generate_verified(config: PythiaConfig, params: Params, prompt_BxP,
                      row_keys_Bx2, temperature, *, max_new_tokens: int,
                      greedy: bool):
  """Same outputs as `generate_dynamo`: (tokens, accepted, passes)."""
  kw = dict(max_new_tokens=max_new_tokens, greedy=greedy)
  state = verified_init(config, params, prompt_BxP, row_keys_Bx2, temperature,
                        **kw)
  state = jax.lax.while_loop(
      functools.partial(not_done, max_new_tokens=max_new_tokens),
      lambda s: verified_body(config, params, s, row_keys_Bx2, temperature,
                              **kw), state)
  return (state.out_BxG[:, :max_new_tokens], state.accepted_BxNp,
          state.passes)
