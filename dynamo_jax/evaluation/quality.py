"""Quality of sampled continuations: the base model's NLL of them, and
distinct-n (so that low NLL bought by repetition does not pass for quality).

Shapes (dynamo_jax.model.config): B rows, P prompt tokens, G continuation
tokens, T = P + G, V vocabulary, X one sequence's length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, forward
from dynamo_jax.training.loss import token_nll


@functools.partial(jax.jit, static_argnums=0)
def _continuation_nll(config, params, prompt_BxP, tokens_BxG):
  full_BxT = jnp.concatenate([prompt_BxP, tokens_BxG], axis=1)
  logits_BxTxV = forward(config, params, full_BxT)  # head 1: the base model
  p = prompt_BxP.shape[1]
  # Position t predicts t+1: the continuation is predicted from P-1 .. P+L-2.
  return token_nll(logits_BxTxV[:, p - 1:-1], tokens_BxG)


def continuation_nll(config: PythiaConfig, params: Params, prompt_BxP,
                     tokens_BxG) -> np.ndarray:
  """float64 [B, L]: -log p_base(token | prompt, earlier tokens), untempered
  (the model's own distribution, whatever temperature sampled them)."""
  return np.asarray(_continuation_nll(
      config, params, jnp.asarray(prompt_BxP, jnp.int32),
      jnp.asarray(tokens_BxG, jnp.int32)), np.float64)


def distinct_n(tokens_X, n: int = 2) -> float:
  """Unique n-grams / all n-grams of one sequence (1.0 for a sequence with
  no repeated n-gram; NaN when it has no n-gram)."""
  toks = [int(t) for t in tokens_X]
  grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
  return len(set(grams)) / len(grams) if grams else float("nan")


def mean_distinct_n(tokens_BxG, n: int = 2) -> float:
  """distinct-n of every row, averaged over rows."""
  return float(np.nanmean([distinct_n(row, n) for row in np.asarray(tokens_BxG)]))
