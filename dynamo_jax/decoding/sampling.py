"""Token sampling from logits: greedy or temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(key: jax.Array, logits_BxV: jax.Array, *, greedy: bool,
                  temperature) -> jax.Array:
  """int32 [B]: argmax when greedy, else one draw from softmax(logits / T)."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      key, logits_BxV.astype(jnp.float32) / temperature, axis=-1
  ).astype(jnp.int32)
