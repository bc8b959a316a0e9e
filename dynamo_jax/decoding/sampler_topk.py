"""Exact top-k over a large vocabulary, faster than lax.top_k on XLA CPU.

`lax.top_k` over V = 50304 costs ~60 us per row here. Two-stage search:
split the last axis into chunks of C, take the top-k chunks by their maximum,
then the top-k of those k*C values. It returns exactly lax.top_k's values
and indices, ties included (lax.top_k orders by value, then lower index):

  Let e be one of lax.top_k's k elements, in chunk c. If c were not among
  the k chunks chosen, each chosen chunk c' would precede c (larger max, or
  equal max and c' < c), and the first maximum of c' would then precede e
  (larger value, or equal value and a lower index, since chunks are
  contiguous and c' < c): k elements before e, a contradiction. The chosen
  chunks are gathered in ascending chunk order, so positions in the gathered
  array rise with the original index and the second top-k breaks ties alike.

Measured at V = 50304, k = 50, 3 heads: 0.13 ms vs 0.18 ms at batch 1,
0.75 ms vs 1.74 ms at batch 8 (C = 64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 64


def exact_top_k(x_BxNxV: jax.Array, k: int, *, chunk: int = CHUNK):
  """(values [B, N, k], indices int32 [B, N, k]) exactly as lax.top_k.
  Here C chunks of Q = `chunk` entries of the vocabulary."""
  b, n, v = x_BxNxV.shape
  chunks = -(-v // chunk)
  if chunks < 2 * k:  # too few chunks for the first stage to prune much
    return jax.lax.top_k(x_BxNxV, k)
  # -inf padding sorts after every real value of the same (-inf) value too,
  # since its indices are the highest; k <= V keeps it out of the result.
  padded = jnp.pad(x_BxNxV, ((0, 0), (0, 0), (0, chunks * chunk - v)),
                   constant_values=-jnp.inf)
  x_BxNxCxQ = padded.reshape(b, n, chunks, chunk)
  _, best_BxNxK = jax.lax.top_k(jnp.max(x_BxNxCxQ, axis=3), k)
  best_BxNxK = jnp.sort(best_BxNxK, axis=2)
  cand_BxNxKxQ = jnp.take_along_axis(x_BxNxCxQ, best_BxNxK[..., None], axis=2)
  values, pos_BxNxK = jax.lax.top_k(cand_BxNxKxQ.reshape(b, n, k * chunk), k)
  ids_BxNxK = (jnp.take_along_axis(best_BxNxK, pos_BxNxK // chunk, axis=2)
               * chunk + pos_BxNxK % chunk)
  return values, ids_BxNxK.astype(jnp.int32)
