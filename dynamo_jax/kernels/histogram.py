"""The grid kernel's cumulative Otsu histogram, one way per backend: NB
compare-and-sum sweeps (TPU) or one-hot matmuls (GPU tensor cores).
Mosaic has no scatter, and Triton's atomics would all hit bin 0 (most of a
probability grid is tiny); see kernels/README.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dynamo_jax.kernels.layout import TRITON_HIST_ENTRIES, Layout, sum_1x1
from dynamo_jax.ops import grid

NB = grid.OTSU_BINS


def histogram_sweep(real_bins, *, layout: Layout):
  """Cumulative Otsu histogram by NB compare-and-sum sweeps per block (TPU:
  plain VPU work, no gathers, scatters or relayouts). `real_bins(start,
  size)` gives int32 [size, Cp] bins (NB on padding). Returns float32
  [1, NB] x 2: lane j = count and sum of bins over entries with bin <= j."""
  f32 = jnp.float32
  tr = layout.block_rows
  bin_1xNB = jax.lax.broadcasted_iota(jnp.int32, (1, NB), 1)

  def block_body(t, carry):
    bins = real_bins(pl.multiple_of(t * tr, tr), tr)

    def per_bin(j, carry):
      le_1xNB, bsum_1xNB = carry
      below = bins <= j
      hit = bin_1xNB == j
      le_1xNB = jnp.where(hit, le_1xNB + sum_1x1(below.astype(f32)), le_1xNB)
      bsum_1xNB = jnp.where(
          hit, bsum_1xNB + sum_1x1(jnp.where(below, bins, 0).astype(f32)),
          bsum_1xNB)
      return le_1xNB, bsum_1xNB

    return jax.lax.fori_loop(0, NB, per_bin, carry)

  zeros_1xNB = jnp.zeros((1, NB), f32)
  return jax.lax.fori_loop(0, layout.num_blocks, block_body,
                           (zeros_1xNB, zeros_1xNB))


def histogram_onehot(real_bins, *, layout: Layout):
  """`histogram_sweep` by one-hot matmuls (GPU tensor cores): with bin =
  16 h + l, counts[h, l] = onehot(h)^T @ onehot(l) over HR rows (J =
  TRITON_HIST_ENTRIES entries) at a time, so registers stay small; 32
  compares per entry instead of NB. 0/1 bf16 operands with f32
  accumulation are exact; so are the prefix sums, done as [16, 16] matmuls
  (IEEE f32) in two levels."""
  f32 = jnp.float32
  hi = jax.lax.Precision.HIGHEST
  side = 16  # Q: NB = Q x Q bins, bin = 16 h + l
  # Rows per matmul: powers of two, so hr divides TR and hence Rp.
  hr = min(max(1, TRITON_HIST_ENTRIES // layout.lanes), layout.block_rows)
  n = hr * layout.lanes
  iota_Qx1 = jax.lax.broadcasted_iota(jnp.int32, (side, 1), 0)
  iota_1xQ = jax.lax.broadcasted_iota(jnp.int32, (1, side), 1)

  def body(i, counts_QxQ):
    # Padding has bin NB, whose h = 16 matches no row of the one-hot.
    bins = real_bins(pl.multiple_of(i * hr, hr), hr)
    hot_h_QxJ = ((bins.reshape(1, n) // side) == iota_Qx1).astype(
        jnp.bfloat16)
    hot_l_JxQ = ((bins.reshape(n, 1) % side) == iota_1xQ).astype(
        jnp.bfloat16)
    return counts_QxQ + jnp.dot(hot_h_QxJ, hot_l_JxQ,
                                preferred_element_type=f32)

  counts_QxQ = jax.lax.fori_loop(0, layout.rows_pad // hr, body,
                                 jnp.zeros((side, side), f32))
  row_QxQ = jax.lax.broadcasted_iota(jnp.int32, (side, side), 0)
  col_QxQ = jax.lax.broadcasted_iota(jnp.int32, (side, side), 1)
  upto_QxQ = (row_QxQ <= col_QxQ).astype(f32)    # [l', l]: l' <= l
  before_QxQ = (col_QxQ < row_QxQ).astype(f32)   # [h, h']: h' < h
  ones_QxQ = jnp.ones((side, side), f32)

  def cumulative(x_QxQ):  # entry (h, l) = sum of x over bins <= 16 h + l
    rows_QxQ = jnp.dot(x_QxQ, ones_QxQ, precision=hi,
                       preferred_element_type=f32)  # row sums, broadcast
    return (jnp.dot(before_QxQ, rows_QxQ, precision=hi,
                    preferred_element_type=f32) +
            jnp.dot(x_QxQ, upto_QxQ, precision=hi,
                    preferred_element_type=f32)).reshape(1, NB)

  bin_QxQ = (row_QxQ * side + col_QxQ).astype(f32)
  return cumulative(counts_QxQ), cumulative(counts_QxQ * bin_QxQ)
