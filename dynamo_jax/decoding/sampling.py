"""Token sampling from logits: greedy or temperature, one key per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed, batch: int) -> jax.Array:
  """uint32 [B, 2]: one PRNG key per row.

  `seed` is an int (row b gets fold_in(PRNGKey(seed), b)) or a sequence of
  B ints (row b gets PRNGKey(seed[b])); with explicit per-row seeds a row's
  tokens do not depend on which batch it is decoded in.
  """
  if isinstance(seed, int):
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))
  return jax.vmap(jax.random.PRNGKey)(jnp.asarray(seed, jnp.uint32))


def sample_tokens(keys_Bx2: jax.Array, logits_BxV: jax.Array, *, greedy: bool,
                  temperature) -> jax.Array:
  """int32 [B]: argmax when greedy, else one draw per row from
  softmax(logits / T) with that row's key."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  return jax.vmap(jax.random.categorical)(keys_Bx2, scaled_BxV).astype(jnp.int32)


def draw_from_probs(keys_B, probs_BxV: jax.Array) -> jax.Array:
  """int32 [B]: one draw per row from probabilities [B, V] (rows need not
  sum to 1; each needs some positive entry), by inverting the cumulative
  sum at u * total with u = uniform(key). The same law as
  `jax.random.categorical(key, log p)`, not the same draws: that one needs
  V random numbers and two logarithms each (a Gumbel per entry), ~0.2 ms a
  draw on XLA:CPU at V = 4096, against ~0.04 ms for one uniform and a
  cumulative sum. A token of probability 0 is never drawn."""
  probs_BxV = probs_BxV.astype(jnp.float32)
  v = probs_BxV.shape[-1]
  cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
  u_B = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys_B) * cdf_BxV[:, -1]
  # The first index whose cumulative sum exceeds u: its probability is > 0.
  idx_B = jnp.sum((cdf_BxV <= u_B[:, None]).astype(jnp.int32), axis=-1)
  # u rounded up to the total: the last token with positive probability.
  last_B = v - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)
  return jnp.minimum(idx_B, last_B).astype(jnp.int32)
