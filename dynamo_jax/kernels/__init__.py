"""Pallas kernels, each beside its jnp reference (design: README.md here).

  threshold_and_draw(ids, probs, seen, weights, eps_b, repetition_penalty, u,
      *, blur, otsu, greedy, kernel="pallas"|"reference", interpret=None,
      backend=None) -> GridDraws: DynaMo's per-step grid work for orders >= 2
      (co-occurrence weighting, blur, Otsu, eps_b, penalty, back-off, draw).
  grid_threshold_draw / grid_threshold_draw_reference: one order, by the
      kernel / by its jnp reference (dynamo_jax.ops.grid).
"""

from dynamo_jax.kernels.dynamo_grid import (BACKENDS, grid_threshold_draw,
                                            grid_threshold_draw_reference)
from dynamo_jax.kernels.threshold_draw import (KERNELS, GridDraws,
                                               resolve_backend,
                                               threshold_and_draw)
