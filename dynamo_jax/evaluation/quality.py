"""Quality of sampled continuations: the base model's NLL of them, and
distinct-n (so that low NLL bought by repetition does not pass for quality).

Shapes: B rows, P prompt tokens, L continuation tokens, V vocabulary.
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
def _continuation_nll(config, params, prompt_BxP, tokens_BxL):
  full_BxPL = jnp.concatenate([prompt_BxP, tokens_BxL], axis=1)
  logits_BxPLxV = forward(config, params, full_BxPL)  # head 1: the base model
  p = prompt_BxP.shape[1]
  # Position t predicts t+1: the continuation is predicted from P-1 .. P+L-2.
  return token_nll(logits_BxPLxV[:, p - 1:-1], tokens_BxL)


def continuation_nll(config: PythiaConfig, params: Params, prompt_BxP,
                     tokens_BxL) -> np.ndarray:
  """float64 [B, L]: -log p_base(token | prompt, earlier tokens), untempered
  (the model's own distribution, whatever temperature sampled them)."""
  return np.asarray(_continuation_nll(
      config, params, jnp.asarray(prompt_BxP, jnp.int32),
      jnp.asarray(tokens_BxL, jnp.int32)), np.float64)


def distinct_n(tokens_L, n: int = 2) -> float:
  """Unique n-grams / all n-grams of one sequence (1.0 for a sequence with
  no repeated n-gram; NaN when it has no n-gram)."""
  toks = [int(t) for t in tokens_L]
  grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
  return len(set(grams)) / len(grams) if grams else float("nan")


def mean_distinct_n(tokens_BxL, n: int = 2) -> float:
  """distinct-n of every row, averaged over rows."""
  return float(np.nanmean([distinct_n(row, n) for row in np.asarray(tokens_BxL)]))
