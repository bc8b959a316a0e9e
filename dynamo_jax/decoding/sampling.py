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
