"""The k^m joint grid of one DynaMo order: build, blur, threshold, draw.

These are the "masking and thresholding" steps of Algorithm 1 (DYNAMO.md
section 3, steps 3-6 and 8) as pure jnp functions of arrays with static
shapes. They are the reference for a later Pallas kernel, so they take and
return plain arrays and hold no Python control flow on traced values.

Shape letters: B batch, M order of the grid (heads 1..M), K top-k, E = K^M
entries of one grid, R = K^(M-1) rows of K entries, NB histogram bins.

Decisions (the paper is silent on each):
  * Blur: the OpenCV `GaussianBlur(ksize=3, sigma=0)` kernel, which for
    ksize 3 is the fixed binomial [1/4, 1/2, 1/4] (sigma ~0.85), one pass per
    grid axis, with OpenCV's default border BORDER_REFLECT_101
    (`dcb|abcd|cba`). The taps are powers of two, so the blur is nearly
    exact in float32.
  * The blur only decides the Otsu mask: Otsu's threshold is computed on the
    blurred grid and an entry survives iff its BLURRED value reaches it, as in
    the image recipe "blur, then Otsu" where the blurred image is what gets
    binarised. The surviving entries keep their UNBLURRED values, so the
    probabilities we sample from remain the model's joint estimate times the
    co-occurrence weights; smoothing only makes the keep/drop decision look at
    neighbours (adjacent cells hold tokens of adjacent rank). A consequence:
    with otsu=False the blur has no effect.
  * Otsu: NB = 256 bins spanning [min, max] of the row's grid (scikit-image's
    choice; a fixed [0, 1] range would put nearly every entry of a 125k-entry
    probability grid in bin 0). Between-class variance uses bin centres; the
    split maximising it (first one on ties) gives the threshold, and entries
    whose bin is at or above the split are kept ("entries below it set to
    0"). A constant grid has no split and keeps everything.
  * The draw inverts the CDF of the flattened grid in C order with one
    uniform u: the chosen entry is the first i with cumsum[i] > u * total.
    It is done in two levels (rows of K, then within the row), which is the
    same index in exact arithmetic and ~6x faster than a 125k-long cumsum on
    CPU. Greedy takes the first maximum in C order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OTSU_BINS = 256
# OpenCV's fixed ksize-3 Gaussian (getGaussianKernel(3, 0)).
BLUR_TAPS = (0.25, 0.5, 0.25)


def joint_grid(probs_BxMxK: jax.Array, weights_BxKxK=None) -> jax.Array:
  """Normalised joint J [B, K, ..., K] (M axes): outer product of the M
  marginals, times the co-occurrence weights when given, renormalised to sum
  1 per row (all-zero rows stay zero)."""
  b, m, k = probs_BxMxK.shape
  joint = probs_BxMxK[:, 0]
  for i in range(1, m):
    joint = joint[..., None] * probs_BxMxK[:, i].reshape((b,) + (1,) * i + (k,))
  if weights_BxKxK is not None:
    joint = joint * weights_BxKxK
  total_B = jnp.sum(joint.reshape(b, -1), axis=1)
  scale_B = jnp.where(total_B > 0, 1.0 / jnp.where(total_B > 0, total_B, 1.0),
                      0.0)
  return joint * scale_B.reshape((b,) + (1,) * m)


def gaussian_blur3(grid: jax.Array) -> jax.Array:
  """Separable 3-tap Gaussian over every axis but the first (batch), with
  reflect-101 borders. Same shape as `grid`."""
  side, center, _ = BLUR_TAPS
  for axis in range(1, grid.ndim):
    size = grid.shape[axis]
    if size == 1:  # reflect-101 of one cell is the cell itself
      continue
    take = lambda lo, hi, a=axis: jax.lax.slice_in_dim(grid, lo, hi, axis=a)
    # Reflect-101: the neighbour before cell 0 is cell 1, after K-1 is K-2.
    before = jnp.concatenate([take(1, 2), take(0, size - 1)], axis=axis)
    after = jnp.concatenate([take(1, size), take(size - 2, size - 1)],
                            axis=axis)
    grid = center * grid + side * (before + after)
  return grid


def otsu_keep(score_BxE: jax.Array) -> jax.Array:
  """bool [B, E]: entries at or above each row's Otsu threshold.

  The histogram is a scatter-add of bin indices (no jnp.histogram: its
  searchsorted is ~5x slower here).
  """
  b, e = score_BxE.shape
  lo_B = jnp.min(score_BxE, axis=1, keepdims=True)
  span_B = jnp.max(score_BxE, axis=1, keepdims=True) - lo_B
  safe_span_B = jnp.where(span_B > 0, span_B, 1.0)
  bins_BxE = jnp.floor((score_BxE - lo_B) / safe_span_B * OTSU_BINS)
  bins_BxE = jnp.clip(bins_BxE, 0, OTSU_BINS - 1).astype(jnp.int32)
  flat = (bins_BxE + OTSU_BINS * jnp.arange(b, dtype=jnp.int32)[:, None])
  counts = jnp.zeros((b * OTSU_BINS,), jnp.int32).at[flat.reshape(-1)].add(1)
  counts_BxNB = counts.reshape(b, OTSU_BINS).astype(jnp.float32)
  # Class 0 = bins < s, class 1 = bins >= s, for splits s = 1..NB-1. Bin
  # centres are measured in bins: Otsu's split is invariant to an affine
  # change of the value axis, so [lo, hi] need not enter.
  centers_NB = jnp.arange(OTSU_BINS, dtype=jnp.float32) + 0.5
  n0 = jnp.cumsum(counts_BxNB, axis=1)[:, :-1]
  s0 = jnp.cumsum(counts_BxNB * centers_NB, axis=1)[:, :-1]
  n1 = e - n0
  s1 = jnp.sum(counts_BxNB * centers_NB, axis=1, keepdims=True) - s0
  valid = (n0 > 0) & (n1 > 0)
  mean_gap = (s0 / jnp.where(valid, n0, 1.0) - s1 / jnp.where(valid, n1, 1.0))
  # w0 * w1 * (mu0 - mu1)^2 up to the constant factor 1 / e^2.
  between = jnp.where(valid, n0 * n1 * mean_gap * mean_gap, -1.0)
  split_B = jnp.argmax(between, axis=1).astype(jnp.int32) + 1
  split_B = jnp.where(jnp.max(between, axis=1) >= 0, split_B, 0)
  return bins_BxE >= split_B[:, None]


def threshold_grid(joint: jax.Array, divisor: jax.Array, eps_b: jax.Array, *,
                   blur: bool, otsu: bool) -> jax.Array:
  """Steps 5-6 on a normalised joint [B, K, ..., K]: Otsu mask (of the
  blurred grid when `blur`), zero entries below eps_b, then divide by the
  repetition-penalty `divisor` (same shape, or broadcastable). Returns the
  final unnormalised grid flattened to [B, E]."""
  b = joint.shape[0]
  joint_BxE = joint.reshape(b, -1)
  keep_BxE = joint_BxE >= eps_b
  if otsu:
    score = gaussian_blur3(joint) if blur else joint
    keep_BxE &= otsu_keep(score.reshape(b, -1))
  return jnp.where(keep_BxE, joint_BxE / divisor.reshape(b, -1), 0.0)


def _first_true(mask_BxL: jax.Array) -> jax.Array:
  """int32 [B]: index of the first True per row, or L when none."""
  length = mask_BxL.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)
  return jnp.min(jnp.where(mask_BxL, idx, length), axis=1)


def _last_true(mask_BxL: jax.Array) -> jax.Array:
  """int32 [B]: index of the last True per row, or 0 when none."""
  idx = jnp.arange(mask_BxL.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask_BxL, idx, 0), axis=1)


def _pick(values_BxL, target_B):
  """First index with cumsum > target among positive entries; rounding can
  leave none (target ~ total), then the last positive entry. Also returns
  the cumulative mass before the chosen index."""
  csum_BxL = jnp.cumsum(values_BxL, axis=1)
  positive = values_BxL > 0
  first = _first_true((csum_BxL > target_B[:, None]) & positive)
  idx = jnp.where(first < values_BxL.shape[1], first, _last_true(positive))
  before = jnp.take_along_axis(csum_BxL - values_BxL, idx[:, None], axis=1)
  return idx, before[:, 0]


def draw_index(grid_BxE: jax.Array, u_B: jax.Array, *, k: int,
               greedy: bool) -> tuple[jax.Array, jax.Array]:
  """(flat C-order index int32 [B], its probability float32 [B]) of one draw
  from each row of the unnormalised grid (all-zero rows give index 0, p 0)."""
  b, e = grid_BxE.shape
  total_B = jnp.sum(grid_BxE, axis=1)
  if greedy:
    peak_B = jnp.max(grid_BxE, axis=1)
    idx_B = jnp.minimum(_first_true(grid_BxE == peak_B[:, None]), e - 1)
  else:
    grid_BxRxK = grid_BxE.reshape(b, e // k, k)
    target_B = u_B * total_B
    row_B, before_B = _pick(jnp.sum(grid_BxRxK, axis=2), target_B)
    cells_BxK = jnp.take_along_axis(grid_BxRxK, row_B[:, None, None],
                                    axis=1)[:, 0]
    col_B, _ = _pick(cells_BxK, target_B - before_B)
    idx_B = row_B * k + col_B
  chosen_B = jnp.take_along_axis(grid_BxE, idx_B[:, None], axis=1)[:, 0]
  prob_B = jnp.where(total_B > 0, chosen_B / jnp.where(total_B > 0, total_B,
                                                       1.0), 0.0)
  return idx_B, prob_B
