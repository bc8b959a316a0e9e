"""The grid kernel's passes over one row's grid, in blocks of TR rows (see
kernels/README.md): (0) joint_scale, (1) scorer + score_bins, (2)
otsu_split, (3) final_grid, (4) draw; dynamo_grid._grid_kernel runs them
in order. Shape letters as in layout.py; NB Otsu bins.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dynamo_jax.kernels.histogram import histogram_onehot, histogram_sweep
from dynamo_jax.kernels.layout import (VALID, Layout, first_flag, last_flag,
                                       sum_1x1)
from dynamo_jax.ops import grid

NB = grid.OTSU_BINS
_SIDE, _CENTER, _ = grid.BLUR_TAPS
BIG = 1 << 30  # "no index" for masked minima


class RowRefs(NamedTuple):
  """One batch row's grid inputs inside the kernel, and the block accessors
  every pass uses."""
  lay: Layout
  plead_ref: Any  # [Rt, 1] f32: outer product of heads 1..M-1
  plast_ref: Any  # [1, Cp] f32: head M's marginal
  w_ref: Any      # [Rt, Cp] f32 co-occurrence weights, or None
  flags_ref: Any  # [Rp, 1] int32: layout.row_flags
  lane_ok: Any    # [1, Cp] bool: a real lane (< K), built once per program

  def block(self, t):
    """The TR rows of block t."""
    tr = self.lay.block_rows
    return pl.ds(pl.multiple_of(t * tr, tr), tr)

  def joint(self, t, d=0):
    """Unnormalised joint [TR, Cp] of block t's rows shifted by d rows."""
    lay = self.lay
    rows = pl.ds(pl.multiple_of(lay.halo + t * lay.block_rows, 8) + d,
                 lay.block_rows)
    joint = self.plead_ref[rows, :] * self.plast_ref[...]
    return joint if self.w_ref is None else joint * self.w_ref[rows, :]

  def valid(self, flags):
    """bool [rows, Cp]: real grid entries, given the rows' flags."""
    return ((flags & VALID) != 0) & self.lane_ok


def joint_scale(row: RowRefs):
  """Pass 0: [1, 1] 1 / the joint's total, 0 for an all-zero grid (as
  ops.grid.joint_grid)."""
  total_1x1 = jax.lax.fori_loop(
      0, row.lay.num_blocks, lambda t, acc: acc + sum_1x1(row.joint(t)),
      jnp.zeros((1, 1), jnp.float32))
  return jnp.where(total_1x1 > 0,
                   1.0 / jnp.where(total_1x1 > 0, total_1x1, 1.0), 0.0)


def scorer(row: RowRefs, scale_1x1, *, blur: bool):
  """score(t, flags) -> [TR, Cp]: the normalised joint on block t, blurred
  as ops.grid.gaussian_blur3 when `blur`."""
  lay, f32 = row.lay, jnp.float32
  k = lay.k
  if not (blur and k > 1):
    return lambda t, flags_TRx1: row.joint(t) * scale_1x1
  # Lane shifts with reflect-101 as exact 0/1 matmuls: x @ S picks column
  # S's one row; padding lanes (>= K) map to 0.
  src_CxC = jax.lax.broadcasted_iota(jnp.int32, (lay.lanes, lay.lanes), 0)
  dst_CxC = jax.lax.broadcasted_iota(jnp.int32, (lay.lanes, lay.lanes), 1)
  prev_src = jnp.where(dst_CxC == 0, 1, dst_CxC - 1)
  next_src = jnp.where(dst_CxC == k - 1, k - 2, dst_CxC + 1)
  shift_prev = ((src_CxC == prev_src) & (dst_CxC < k)).astype(f32)
  shift_next = ((src_CxC == next_src) & (dst_CxC < k)).astype(f32)
  hi = jax.lax.Precision.HIGHEST

  def blurred(t, flags_TRx1):
    def level(a, d):  # row axes 0..a-1 blurred, at row offset d
      if a == 0:
        return row.joint(t, d) * scale_1x1
      stride = lay.strides[a - 1]
      here = level(a - 1, d)
      prev, nxt = level(a - 1, d - stride), level(a - 1, d + stride)
      # Offsets along finer axes never change this axis' position, so the
      # block's own flags apply at every d (reflect-101: x[-1] = x[1]).
      first = (flags_TRx1 & first_flag(a - 1)) != 0
      last = (flags_TRx1 & last_flag(a - 1)) != 0
      return _CENTER * here + _SIDE * (jnp.where(first, nxt, prev) +
                                       jnp.where(last, prev, nxt))

    x = level(lay.m - 1, 0)
    prev = jnp.dot(x, shift_prev, precision=hi, preferred_element_type=f32)
    nxt = jnp.dot(x, shift_next, precision=hi, preferred_element_type=f32)
    return _CENTER * x + _SIDE * (prev + nxt)

  return blurred


def score_bins(row: RowRefs, score_of, score_ref, sync):
  """Pass 1: each block's score into score_ref and the range of the real
  entries' scores. Returns bins(rows) -> int32 [rows, Cp], the Otsu bin of
  each stored score (as ops.grid.otsu_keep)."""
  f32 = jnp.float32
  big = jnp.finfo(f32).max

  def range_body(t, carry):
    lo, hi_ = carry
    flags_TRx1 = row.flags_ref[row.block(t), :]
    score = score_of(t, flags_TRx1)
    score_ref[row.block(t), :] = score
    valid = row.valid(flags_TRx1)
    lo = jnp.minimum(lo, jnp.min(jnp.min(jnp.where(valid, score, big),
                                         axis=1, keepdims=True), axis=0,
                                 keepdims=True))
    hi_ = jnp.maximum(hi_, jnp.max(jnp.max(jnp.where(valid, score, -big),
                                           axis=1, keepdims=True), axis=0,
                                   keepdims=True))
    return lo, hi_

  lo_1x1, hi_1x1 = jax.lax.fori_loop(
      0, row.lay.num_blocks, range_body,
      (jnp.full((1, 1), big, f32), jnp.full((1, 1), -big, f32)))
  span_1x1 = hi_1x1 - lo_1x1
  safe_span_1x1 = jnp.where(span_1x1 > 0, span_1x1, 1.0)
  sync()

  def bins_at(rows):
    score = score_ref[rows, :]
    bins = jnp.floor((score - lo_1x1) / safe_span_1x1 * NB)
    return jnp.clip(bins, 0, NB - 1).astype(jnp.int32)

  return bins_at


def otsu_split(row: RowRefs, bins_at):
  """Pass 2: the cumulative histogram of the real entries' bins, then
  Otsu's split as ops.grid.otsu_keep (split s = j + 1 for lanes j < NB-1).
  Returns int32 [1, 1]: entries with bin >= split are kept."""
  lay = row.lay

  def real_bins(start, size):
    """int32 [size, Cp]: bins of rows start.., NB on padding."""
    rows = pl.ds(start, size)
    return jnp.where(row.valid(row.flags_ref[rows, :]), bins_at(rows), NB)

  # Lane j of le/bsum = count / sum of bins over entries with bin <= j (so
  # lane NB-1 holds E and the sum of all bins). f32 counts are exact below
  # 2^24 entries.
  hist = histogram_onehot if lay.backend == "triton" else histogram_sweep
  le_1xNB, bsum_1xNB = hist(real_bins, layout=lay)
  bin_1xNB = jax.lax.broadcasted_iota(jnp.int32, (1, NB), 1)
  e = float(lay.k ** lay.m)
  n0 = le_1xNB
  s0 = bsum_1xNB + 0.5 * n0
  all_s = jnp.sum(jnp.where(bin_1xNB == NB - 1, bsum_1xNB, 0.0), axis=1,
                  keepdims=True) + 0.5 * e
  n1 = e - n0
  s1 = all_s - s0
  ok = (n0 > 0) & (n1 > 0) & (bin_1xNB < NB - 1)
  gap = s0 / jnp.where(ok, n0, 1.0) - s1 / jnp.where(ok, n1, 1.0)
  between = jnp.where(ok, n0 * n1 * gap * gap, -1.0)
  best_1x1 = jnp.max(between, axis=1, keepdims=True)
  first_1x1 = jnp.min(jnp.where(between == best_1x1, bin_1xNB, NB), axis=1,
                      keepdims=True)
  return jnp.where(best_1x1 >= 0, first_1x1 + 1, 0)


def final_grid(row: RowRefs, dlead_ref, dlast_ref, final_ref, scale_1x1,
                eps_1x1, otsu_keep):
  """Pass 3: the final grid (steps 5-6) into final_ref, its total, peak
  and first argmax (C order), each [1, 1]. otsu_keep(t): Otsu's mask of
  block t, or None without Otsu."""
  lay, f32 = row.lay, jnp.float32
  tr, k = lay.block_rows, lay.k
  col_TRx1 = jax.lax.broadcasted_iota(jnp.int32, (tr, 1), 0)
  lane_1xC = jax.lax.broadcasted_iota(jnp.int32, (1, lay.lanes), 1)

  def final_body(t, carry):
    total_f, peak, argmax = carry
    valid = row.valid(row.flags_ref[row.block(t), :])
    joint = row.joint(t) * scale_1x1
    keep = valid & (joint >= eps_1x1)
    if otsu_keep is not None:
      keep = keep & otsu_keep(t)
    divisor = dlead_ref[row.block(t), :] * dlast_ref[...]
    fin = jnp.where(keep, joint / divisor, 0.0)
    final_ref[row.block(t), :] = fin
    total_f = total_f + sum_1x1(fin)
    blk_peak = jnp.max(jnp.max(fin, axis=1, keepdims=True), axis=0,
                       keepdims=True)
    flat = (t * tr + col_TRx1) * k + lane_1xC
    blk_arg = jnp.min(jnp.min(
        jnp.where(valid & (fin == blk_peak), flat, BIG), axis=1,
        keepdims=True), axis=0, keepdims=True)
    better = blk_peak > peak  # ties keep the earlier (C-order first) block
    return (total_f, jnp.where(better, blk_peak, peak),
            jnp.where(better, blk_arg, argmax))

  return jax.lax.fori_loop(
      0, lay.num_blocks, final_body,
      (jnp.zeros((1, 1), f32), jnp.full((1, 1), -1.0, f32),
       jnp.zeros((1, 1), jnp.int32)))


def draw(final_ref, flags_ref, target_1x1, *, layout: Layout, sync):
  """Pass 4, ops.grid.draw_index's inverse CDF in two levels: the first
  row whose running sum exceeds the target (else the last positive row),
  then the same within that row. Returns (flat index, chosen entry)."""
  lay = layout
  tr, cp, k = lay.block_rows, lay.lanes, lay.k
  f32 = jnp.float32
  sync()
  row_TRxTR = jax.lax.broadcasted_iota(jnp.int32, (tr, tr), 0)
  col_TRxTR = jax.lax.broadcasted_iota(jnp.int32, (tr, tr), 1)
  idx_TRx1 = jax.lax.broadcasted_iota(jnp.int32, (tr, 1), 0)

  def take_row(fin, sel_TRx1):  # [1, Cp]: the selected row (one or none)
    return jnp.sum(jnp.where(sel_TRx1, fin, 0.0), axis=0, keepdims=True)

  def body(t, carry):
    (running, found, f_before, f_cells, last, l_before, l_cells) = carry
    rows = pl.ds(pl.multiple_of(t * tr, tr), tr)
    fin = final_ref[rows, :]
    rs_TRx1 = jnp.sum(fin, axis=1, keepdims=True)
    # Transpose by a masked sum, then an inclusive prefix by a triangle.
    rs_1xTR = jnp.sum(jnp.where(row_TRxTR == col_TRxTR, rs_TRx1, 0.0),
                      axis=0, keepdims=True)
    pre_TRx1 = running + jnp.sum(jnp.where(col_TRxTR <= row_TRxTR, rs_1xTR,
                                           0.0), axis=1, keepdims=True)
    positive = (rs_TRx1 > 0) & ((flags_ref[rows, :] & VALID) != 0)
    cand = positive & (pre_TRx1 > target_1x1)
    first = jnp.min(jnp.where(cand, idx_TRx1, tr), axis=0, keepdims=True)
    new = (found == BIG) & (first < tr)
    sel = idx_TRx1 == first
    found = jnp.where(new, t * tr + first, found)
    f_before = jnp.where(new, sum_1x1(jnp.where(sel, pre_TRx1 - rs_TRx1,
                                                0.0)), f_before)
    f_cells = jnp.where(new, take_row(fin, sel), f_cells)
    lst = jnp.max(jnp.where(positive, idx_TRx1, -1), axis=0, keepdims=True)
    has = lst >= 0
    sel = idx_TRx1 == lst
    last = jnp.where(has, t * tr + lst, last)
    l_before = jnp.where(has, sum_1x1(jnp.where(sel, pre_TRx1 - rs_TRx1,
                                                0.0)), l_before)
    l_cells = jnp.where(has, take_row(fin, sel), l_cells)
    return (running + sum_1x1(rs_TRx1), found, f_before, f_cells, last,
            l_before, l_cells)

  zero = jnp.zeros((1, 1), f32)
  zero_cells = jnp.zeros((1, cp), f32)
  init = (zero, jnp.full((1, 1), BIG, jnp.int32), zero, zero_cells,
          jnp.zeros((1, 1), jnp.int32), zero, zero_cells)
  _, found, f_before, f_cells, last, l_before, l_cells = jax.lax.fori_loop(
      0, lay.num_blocks, body, init)
  hit = found < BIG
  row = jnp.where(hit, found, last)
  before = jnp.where(hit, f_before, l_before)
  cells_1xC = jnp.where(hit, f_cells, l_cells)

  # Within the row: the same pick over its K cells.
  src_CxC = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 0)
  dst_CxC = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 1)
  idx_Cx1 = jax.lax.broadcasted_iota(jnp.int32, (cp, 1), 0)
  cells_Cx1 = jnp.sum(jnp.where(src_CxC == dst_CxC, cells_1xC, 0.0), axis=1,
                      keepdims=True)
  pre_Cx1 = jnp.sum(jnp.where(dst_CxC <= src_CxC, cells_1xC, 0.0), axis=1,
                    keepdims=True)
  positive = cells_Cx1 > 0
  cand = positive & (pre_Cx1 > target_1x1 - before)
  first = jnp.min(jnp.where(cand, idx_Cx1, cp), axis=0, keepdims=True)
  lst = jnp.max(jnp.where(positive, idx_Cx1, 0), axis=0, keepdims=True)
  col = jnp.where(first < cp, first, lst)
  chosen = jnp.sum(jnp.where(idx_Cx1 == col, cells_Cx1, 0.0), axis=0,
                   keepdims=True)
  return row * k + col, chosen
