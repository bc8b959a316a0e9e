"""Pallas kernels, each beside its jnp reference.

  threshold_and_draw(ids, probs, seen, weights, eps_b, repetition_penalty, u,
      *, blur, otsu, greedy, kernel="pallas"|"reference", interpret=None,
      backend=None) -> GridDraws: DynaMo's per-step grid work for orders >= 2
      (co-occurrence weighting, blur, Otsu, eps_b, penalty, back-off, draw).
  dynamo_grid.grid_threshold_draw / grid_threshold_draw_reference: one order.
"""

from dynamo_jax.kernels.dynamo_grid import (BACKENDS, grid_threshold_draw,
                                            grid_threshold_draw_reference)
from dynamo_jax.kernels.threshold_draw import (KERNELS, GridDraws,
                                               resolve_backend,
                                               threshold_and_draw)
