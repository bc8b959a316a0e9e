"""The k^m joint grid of one DynaMo order: build, blur, threshold, draw.

These are the "masking and thresholding" steps of Algorithm 1 (DYNAMO.md
section 3, steps 3-6 and 8) as pure jnp functions of arrays with static
shapes, and `grid_threshold_draw_reference`, the one-order op they make up:
the decode step's reference path and the jnp reference of the Pallas kernel
(dynamo_jax/kernels). No Python control flow on traced values.

Shape letters: B batch, M order of the grid (heads 1..M), K top-k, E = K^M
entries of one grid, R = K^(M-1) rows of K entries, X a generic length;
here NB histogram bins.

Decisions (the paper is silent on each):
  * Blur: OpenCV's `GaussianBlur(ksize=3, sigma=0)` kernel. For ksize 3
    OpenCV uses its fixed table [1/4, 1/2, 1/4] (the binomial kernel, standard
    deviation 1/sqrt(2)), not a sampled Gaussian of its default sigma 0.8
    ([0.239, 0.522, 0.239]); we do the same. One pass per grid axis, with
    OpenCV's default border BORDER_REFLECT_101 (`dcb|abcd|cba`). The taps
    are powers of two, so the blur is nearly exact in float32.
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


def outer_product(f_BxMxK: jax.Array) -> jax.Array:
  """[B, K, ..., K] (M axes): entry (i_1..i_M) = prod_j f[:, j, i_j],
  multiplied left to right (the joint, the penalty divisor and the kernel's
  inputs all round the same way)."""
  b, m, k = f_BxMxK.shape
  out = f_BxMxK[:, 0]
  for i in range(1, m):
    out = out[..., None] * f_BxMxK[:, i].reshape((b,) + (1,) * i + (k,))
  return out


def joint_grid(probs_BxMxK: jax.Array, weights=None) -> jax.Array:
  """Normalised joint J [B, K, ..., K] (M axes): outer product of the M
  marginals, times the co-occurrence `weights` [B, K, ..., K] when given,
  renormalised to sum 1 per row (all-zero rows stay zero)."""
  b, m, _ = probs_BxMxK.shape
  joint = outer_product(probs_BxMxK)
  if weights is not None:
    joint = joint * weights
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
    cells = lambda lo, hi, a=axis, g=grid: jax.lax.slice_in_dim(g, lo, hi,
                                                               axis=a)
    # Reflect-101 makes both neighbours of an edge cell its inner neighbour.
    # Interior and edges computed apart and concatenated fuse into one loop;
    # padding first ran 2x slower on XLA CPU (the padded copy materialised).
    inner = center * cells(1, size - 1) + side * (cells(0, size - 2) +
                                                  cells(2, size))
    first = center * (cells(0, 1) + cells(1, 2))
    last = center * (cells(size - 1, size) + cells(size - 2, size - 1))
    grid = jnp.concatenate([first, inner, last], axis=axis)
  return grid


def otsu_keep(score: jax.Array) -> jax.Array:
  """bool, same shape as score [B, ...]: entries at or above their row's
  Otsu threshold (a row is everything after the batch axis).

  The histogram is a scatter-add of bin indices, not
  jnp.histogram, whose searchsorted is ~5x slower here. Shapes stay those of
  the grid: mixing [B, E] and [B, K, K, K] views of the same data in one XLA
  CPU loop cost ~35% at B=8. Scattering only the rows of K entries that
  hold a bin > 0 (most rows are all in bin 0) gave the same counts but was
  slower at K=50, M=3 (0.21 vs 0.17 ms, load ~9): the extra pass finding
  those rows and the gather cost more than the scatter they save.
  """
  b, e = score.shape[0], score[0].size
  axes = tuple(range(1, score.ndim))
  row_shape = (b,) + (1,) * len(axes)
  lo = jnp.min(score, axis=axes, keepdims=True)
  span = jnp.max(score, axis=axes, keepdims=True) - lo
  safe_span = jnp.where(span > 0, span, 1.0)
  bins = jnp.floor((score - lo) / safe_span * OTSU_BINS)
  bins = jnp.clip(bins, 0, OTSU_BINS - 1).astype(jnp.int32)
  flat = bins + OTSU_BINS * jnp.arange(b, dtype=jnp.int32).reshape(row_shape)
  # A scatter-add of ones; the ones are computed from the indices (always
  # 1: bins are clipped to >= 0) because a constant update array is
  # materialised as its own 125k-entry buffer on every call (~10% of the
  # whole sampler on XLA CPU), while this one fuses into the scatter.
  idx = flat.reshape(-1)
  counts = jnp.zeros((b * OTSU_BINS,), jnp.int32).at[idx].add(
      (idx >= 0).astype(jnp.int32), mode="promise_in_bounds")
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
  return bins >= split_B.reshape(row_shape)


def threshold_grid(joint: jax.Array, divisor: jax.Array, eps_b: jax.Array, *,
                   blur: bool, otsu: bool) -> jax.Array:
  """Steps 5-6 on a normalised joint [B, K, ..., K]: Otsu mask (of the
  blurred grid when `blur`), zero entries below eps_b, then divide by the
  repetition-penalty `divisor` (same shape). Returns the final unnormalised
  grid flattened to [B, E]."""
  keep = joint >= eps_b
  if otsu:
    keep &= otsu_keep(gaussian_blur3(joint) if blur else joint)
  return jnp.where(keep, joint / divisor, 0.0).reshape(joint.shape[0], -1)


def _first_true(mask_BxX: jax.Array) -> jax.Array:
  """int32 [B]: index of the first True per row, or L when none."""
  length = mask_BxX.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)
  return jnp.min(jnp.where(mask_BxX, idx, length), axis=1)


def _last_true(mask_BxX: jax.Array) -> jax.Array:
  """int32 [B]: index of the last True per row, or 0 when none."""
  idx = jnp.arange(mask_BxX.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask_BxX, idx, 0), axis=1)


def _pick(values_BxX, target_B):
  """First index with cumsum > target among positive entries; rounding can
  leave none (target ~ total), then the last positive entry. Also returns
  the cumulative mass before the chosen index."""
  csum_BxX = jnp.cumsum(values_BxX, axis=1)
  positive = values_BxX > 0
  first = _first_true((csum_BxX > target_B[:, None]) & positive)
  idx = jnp.where(first < values_BxX.shape[1], first, _last_true(positive))
  before = jnp.take_along_axis(csum_BxX - values_BxX, idx[:, None], axis=1)
  return idx, before[:, 0]


def draw_index(grid_BxE: jax.Array, u_B: jax.Array, *, k: int,
               greedy: bool) -> tuple[jax.Array, jax.Array]:
  """(flat C-order index int32 [B], its probability float32 [B]) of one draw
  from each row of the unnormalised grid (all-zero rows give index 0, p 0)."""
  b, e = grid_BxE.shape
  grid_BxRxK = grid_BxE.reshape(b, e // k, k)
  rows_BxR = jnp.sum(grid_BxRxK, axis=2)
  total_B = jnp.sum(rows_BxR, axis=1)  # one pass over the grid, not two
  if greedy:
    peak_B = jnp.max(grid_BxE, axis=1)
    idx_B = jnp.minimum(_first_true(grid_BxE == peak_B[:, None]), e - 1)
  else:
    target_B = u_B * total_B
    row_B, before_B = _pick(rows_BxR, target_B)
    cells_BxK = jnp.take_along_axis(grid_BxRxK, row_B[:, None, None],
                                    axis=1)[:, 0]
    col_B, _ = _pick(cells_BxK, target_B - before_B)
    idx_B = row_B * k + col_B
  chosen_B = jnp.take_along_axis(grid_BxE, idx_B[:, None], axis=1)[:, 0]
  safe_total_B = jnp.where(total_B > 0, total_B, 1.0)
  return idx_B, jnp.where(total_B > 0, chosen_B / safe_total_B, 0.0)


def flat_to_tuple(flat_B: jax.Array, ids_BxNxK: jax.Array, *, m: int, k: int,
                  n: int) -> jax.Array:
  """int32 [B, n]: the token tuple at a C-order flat index of an order-m
  grid (position along each of the m axes -> that head's top-k id), padded
  with zeros to n."""
  pos_BxM = jnp.stack([(flat_B // k ** (m - 1 - i)) % k for i in range(m)],
                      axis=1)
  tuple_BxM = jnp.take_along_axis(ids_BxNxK[:, :m], pos_BxM[..., None],
                                  axis=2)[..., 0]
  return jnp.pad(tuple_BxM, ((0, 0), (0, n - m)))


def grid_threshold_draw_reference(probs_BxMxK: jax.Array, weights,
                                  div_BxMxK: jax.Array, u_B: jax.Array,
                                  eps_b: jax.Array, *, blur: bool = True,
                                  otsu: bool = True, greedy: bool = False):
  """Steps 3-6 and 8 for one order M >= 2: the jnp reference of
  dynamo_jax.kernels.grid_threshold_draw (same arguments less the backend
  options, same returns).

  Args:
    probs_BxMxK: float32 [B, M, K], heads 1..M's top-k marginals.
    weights: None or float32 [B, K, ..., K] (M axes), co-occurrence weights.
    div_BxMxK: float32 [B, M, K], each head's repetition-penalty factor
      (repetition_penalty where the token was seen, else 1).
    u_B: float32 [B], the uniform of each row's draw (ignored if greedy).
    eps_b: float32 [].
    blur, otsu, greedy: as threshold_grid / draw_index.

  Returns:
    (flat_B int32: C-order index of the drawn entry, prob_B float32: its
    probability under the final grid, peak_B float32: the final grid's
    largest entry, which the back-off tests).
  """
  b, _, k = probs_BxMxK.shape
  weights = None if weights is None else weights.astype(jnp.float32)
  joint = joint_grid(probs_BxMxK, weights)

  def final(joint):
    divisor = outer_product(div_BxMxK.astype(jnp.float32))
    grid_BxE = threshold_grid(joint, divisor, eps_b, blur=blur, otsu=otsu)
    flat_B, prob_B = draw_index(grid_BxE, u_B, k=k, greedy=greedy)
    return flat_B, prob_B, jnp.max(grid_BxE, axis=1)

  def all_zero(_):
    # What `final` returns for a grid without an entry >= eps_b: every
    # entry is thresholded to 0, so the draw is index 0 with p 0, peak 0.
    return (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), jnp.float32))

  # Blur, Otsu and the draw only matter where some entry reaches eps_b; at
  # most 1 / eps_b entries can (J sums to 1), and in most steps of a real
  # model at eps_b 0.5 none does. Skipping them gives the same outputs.
  return jax.lax.cond(jnp.max(joint) >= eps_b, final, all_zero, joint)
