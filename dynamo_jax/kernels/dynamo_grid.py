"""One order's grid post-processing (Algorithm 1, steps 3-6 and 8) as a
fused Pallas kernel, beside its jnp reference.

`grid_threshold_draw` takes the M top-k marginals of one order, the
co-occurrence weights of its K^M grid and the repetition-penalty factors,
and returns what the decode step needs from that grid: the drawn entry's
C-order flat index, its probability under the final grid, and the grid's
largest final entry (the back-off test's peak). `grid_threshold_draw_reference`
computes the same with `sampler_grid`'s functions (the tested jnp sampler),
so the two agree by construction of their inputs.

Shape letters: B batch, M order, K top-k, E = K^M grid entries, R = K^(M-1)
grid rows of K cells (the row index is the C-order position along the first
M-1 axes, the lane index the last axis), and for the kernel's layout: Rp
rows padded to a multiple of TR (rows per block), Hp halo rows above and
below, Rt = Hp + Rp + Hp, Cp lanes (K padded), NB Otsu bins.

Design (one program per batch row, grid = (B,)):
  * Co-occurrence look-up: done by XLA outside the kernel (the caller's
    `cooc.grid_weights`, a hash-trie gather) and handed over as a dense,
    zero-padded [Rt, Cp] tile per row. The kernel never sees the table, so
    it needs no gathers (Mosaic TPU has none for HBM tables); the passes
    that need the weights read them from VMEM (TPU) or L1/L2 (GPU).
  * The row's grid is walked in blocks of TR rows by `fori_loop`s, five
    passes: (0) the joint's total; (1) the normalised joint, its blur and
    the blurred min/max (blurred values kept in a scratch buffer); (2) the
    Otsu histogram as cumulative counts (count and bin-sum of entries with
    bin <= j, for every j), then Otsu's split; (3) the final grid (eps_b,
    Otsu, penalty; kept in a second scratch buffer), its total, peak and
    first argmax; (4) the draw: running row prefix sums find the row, the
    row's own prefix sums the cell. Prefix sums inside a block are masked
    sums over a [TR, TR] (or [Cp, Cp]) triangle: no cumsum (Mosaic has none).
  * Histogram: no scatter exists in Mosaic and Triton's atomics would all
    hit bin 0 (most of a probability grid is tiny). TPU: NB vectorised
    compare-and-sum sweeps per block (~NB * E VPU operations per row, the
    TPU kernel's hot spot). GPU: one-hot matmuls on the tensor cores
    (bin = 16 h + l, counts = onehot(h)^T @ onehot(l)), 32 compares per
    entry; exact, as 0/1 bf16 products accumulate in f32.
  * The blur is separable and uses the reference's arithmetic: along the
    row axes, shifted windows of the inputs (hence the halo rows; offsets
    +-1, +-K, ...) with reflect-101 chosen by per-row flags; along the lane
    axis, shifts by exact 0/1 permutation matmuls (precision HIGHEST: IEEE
    f32 on Triton, the bf16x6 MXU path on TPU, both exact for a 0/1
    matrix), then center * x + side * (prev + next) as in sampler_grid.
  * Scalars live in [1, 1] arrays and are selected with masks, never
    extracted to scalar registers or used as dynamic indices.

Backends: "tpu" (Mosaic TPU: VMEM scratch, Cp a multiple of 128, TR a
multiple of 8) and "triton" for GPUs. Triton rather than Mosaic GPU:
Mosaic GPU stages every block through shared memory (a K=50, M=3 row is
0.5-1.3 MB, over the 227 KB of an H100), its `pallas_call` entry point is
deprecated in favour of `plgpu.kernel`, and it only targets Hopper and
newer; Triton reads windows at any offset straight from global memory
(cached in L1/L2), lowers loops, reductions and small dots, and runs on
Ampere and ROCm too. Triton needs power-of-two value shapes: Cp and TR are
powers of two and padding is masked. It has no scratch memory, so the two
buffers are extra outputs in global memory, with a CTA barrier between the
pass that writes and the pass that reads them.

Exactness: every step repeats the reference's float operations in its
order (the blur's taps, Otsu's formula, 1 / total); the sums (the joint's
total, row and prefix sums) add in another order, so values differ from
the reference by float rounding (~1e-7 relative). A token can differ only
if a value sits within that rounding of an Otsu bin edge, of eps_b or of
u * total; none did in ~5,000 random rows (tests/test_kernels.py checks
same m and tokens, probabilities within 1e-5).

Checked without accelerators: interpret mode (both layouts, TPU semantics
for "tpu"), jax.export for "tpu" and "cuda", and the Triton IR compiled to
sm_90 with ptxas by `triton_offline.py` (no register spills at K = 50,
M = 3). Not yet run or timed on a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from dynamo_jax.decoding import sampler_grid
from dynamo_jax.errors import InputError

BACKENDS = ("tpu", "triton")
NB = sampler_grid.OTSU_BINS
_SIDE, _CENTER, _ = sampler_grid.BLUR_TAPS
_LANES = 128  # the [1, 128] rows that carry scalars in and out
_VALID = 1 << 30  # row flag: a real grid row (not padding)
_BIG = 1 << 30  # "no index" for masked minima
# The custom call a Triton kernel lowers to. jax.export refuses it by default
# (no compatibility guarantee across jaxlib versions): an export for "cuda"
# passes jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL), and
# the artifact is only good for the jaxlib that wrote it.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


# Triton tuning, chosen offline (kernels/triton_offline.py: Triton 3.9 and
# ptxas for sm_90a, K = 50, M = 3): 237 registers per thread, no spills,
# 116 KB of shared memory (loads of the next block are pipelined), which
# fits an A100 or H100 but not the ~100 KB of consumer GPUs (num_stages=1
# then). Not timed on a GPU yet.
TRITON_BLOCK_ROWS = 32     # TR
TRITON_HIST_ENTRIES = 512  # entries per one-hot histogram matmul
TRITON_NUM_WARPS = 8
TRITON_NUM_STAGES = 2


def _first_flag(axis: int) -> int:
  return 1 << (2 * axis)


def _last_flag(axis: int) -> int:
  return 1 << (2 * axis + 1)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Layout:
  """The kernel's padded view of one row's K^M grid (all static)."""
  k: int
  m: int
  backend: str
  rows: int        # R = K^(M-1)
  block_rows: int  # TR
  rows_pad: int    # Rp, a multiple of TR
  halo: int        # Hp, >= the largest row offset of the blur
  lanes: int       # Cp >= K

  @property
  def total_rows(self) -> int:  # Rt
    return self.halo + self.rows_pad + self.halo

  @property
  def num_blocks(self) -> int:
    return self.rows_pad // self.block_rows

  @property
  def strides(self) -> tuple[int, ...]:
    """Row offset of one step along each of the first M-1 grid axes."""
    return tuple(self.k ** (self.m - 2 - a) for a in range(self.m - 1))


def make_layout(k: int, m: int, backend: str,
                block_rows: int | None = None) -> Layout:
  """Padding and blocking of a K^M grid for `backend`."""
  rows = k ** (m - 1)
  if backend == "tpu":
    lanes = _round_up(k, 128)
    tr = block_rows or 64
    tr = min(_round_up(tr, 8), _round_up(rows, 8))
  else:
    # Triton: power-of-two shapes; tl.dot needs every dimension >= 16.
    lanes = max(16, _next_pow2(k))
    tr = block_rows or TRITON_BLOCK_ROWS
    tr = max(16, min(_next_pow2(tr), _next_pow2(rows)))
  reach = sum(k ** (m - 2 - a) for a in range(m - 1)) if k > 1 else 0
  return Layout(k=k, m=m, backend=backend, rows=rows, block_rows=tr,
                rows_pad=_round_up(rows, tr), halo=_round_up(max(reach, 1), 8),
                lanes=lanes)


def _row_flags(layout: Layout) -> np.ndarray:
  """int32 [Rp, 1]: per grid row, _VALID and first/last-cell bits of each
  row axis (integer division is avoided inside the kernel)."""
  r = np.arange(layout.rows_pad)
  flags = np.where(r < layout.rows, _VALID, 0)
  for a, stride in enumerate(layout.strides):
    pos = (r // stride) % layout.k
    flags |= np.where(pos == 0, _first_flag(a), 0)
    flags |= np.where(pos == layout.k - 1, _last_flag(a), 0)
  return flags.astype(np.int32)[:, None]


def _outer(f_BxMxK: jax.Array) -> jax.Array:
  """[B, K, ..., K] (M axes): outer product of the M factors, multiplied in
  the order of sampler_grid.joint_grid / dynamo_sampler.penalty_divisor."""
  b, m, k = f_BxMxK.shape
  out = f_BxMxK[:, 0]
  for i in range(1, m):
    out = out[..., None] * f_BxMxK[:, i].reshape((b,) + (1,) * i + (k,))
  return out


def _grid_kernel(params_ref,  # [1, 128] f32: lane 0 u, lane 1 eps_b
                 plead_ref,   # [Rt, 1] f32: outer product of heads 1..M-1
                 plast_ref,   # [1, Cp] f32: head M's marginal
                 dlead_ref,   # [Rp, 1] f32: penalty factor of heads 1..M-1
                 dlast_ref,   # [1, Cp] f32: penalty factor of head M
                 flags_ref,   # [Rp, 1] int32: _row_flags
                 *refs,       # [w_ref [Rt, Cp] f32 when has_weights],
                              # idx_ref [1, 128] int32 (out: flat index),
                              # val_ref [1, 128] f32 (out: lane 0 p, 1 peak),
                              # score_ref [Rp, Cp] f32 (scratch: blurred),
                              # final_ref [Rp, Cp] f32 (scratch: final grid)
                 layout: Layout, has_weights: bool, blur: bool, otsu: bool,
                 greedy: bool, barrier: bool):
  if has_weights:
    w_ref, *refs = refs
  idx_ref, val_ref, score_ref, final_ref = refs
  lay = layout
  tr, cp, k = lay.block_rows, lay.lanes, lay.k
  f32 = jnp.float32
  hi = jax.lax.Precision.HIGHEST
  lane_1xC = jax.lax.broadcasted_iota(jnp.int32, (1, cp), 1)
  lane_ok_1xC = lane_1xC < k
  col_TRx1 = jax.lax.broadcasted_iota(jnp.int32, (tr, 1), 0)
  params_1xL = params_ref[...]
  lane_1xL = jax.lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
  pick = lambda x, i: jnp.sum(jnp.where(lane_1xL == i, x, 0), axis=1,
                              keepdims=True)
  u_1x1, eps_1x1 = pick(params_1xL, 0), pick(params_1xL, 1)
  total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0,
                            keepdims=True)  # [1, 1]
  sync = pltriton.debug_barrier if barrier else (lambda: None)

  def block(t):
    return pl.ds(pl.multiple_of(t * tr, tr), tr)

  def joint_at(t, d):
    """Unnormalised joint [TR, Cp] of block t's rows shifted by d rows."""
    rows = pl.ds(pl.multiple_of(lay.halo + t * tr, 8) + d, tr)
    joint = plead_ref[rows, :] * plast_ref[...]
    return joint * w_ref[rows, :] if has_weights else joint

  def flags_of(t):
    return flags_ref[block(t), :]

  def valid_of(flags_TRx1):
    return ((flags_TRx1 & _VALID) != 0) & lane_ok_1xC

  # Pass 0: the joint's total, then 1 / total as sampler_grid.joint_grid.
  def sum_body(t, acc):
    return acc + total(joint_at(t, 0))

  total_1x1 = jax.lax.fori_loop(0, lay.num_blocks, sum_body,
                                jnp.zeros((1, 1), f32))
  scale_1x1 = jnp.where(total_1x1 > 0,
                        1.0 / jnp.where(total_1x1 > 0, total_1x1, 1.0), 0.0)

  if blur and k > 1:
    # Lane shifts with reflect-101 as exact 0/1 matmuls: x @ S picks column
    # S's one row; padding lanes (>= K) map to 0.
    src_CxC = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 0)
    dst_CxC = jax.lax.broadcasted_iota(jnp.int32, (cp, cp), 1)
    prev_src = jnp.where(dst_CxC == 0, 1, dst_CxC - 1)
    next_src = jnp.where(dst_CxC == k - 1, k - 2, dst_CxC + 1)
    shift_prev = ((src_CxC == prev_src) & (dst_CxC < k)).astype(f32)
    shift_next = ((src_CxC == next_src) & (dst_CxC < k)).astype(f32)

  def blurred(t, flags_TRx1):
    """sampler_grid.gaussian_blur3 of the normalised joint on block t."""
    def level(a, d):  # row axes 0..a-1 blurred, at row offset d
      if a == 0:
        return joint_at(t, d) * scale_1x1
      stride = lay.strides[a - 1]
      here = level(a - 1, d)
      prev, nxt = level(a - 1, d - stride), level(a - 1, d + stride)
      # Offsets along finer axes never change this axis' position, so the
      # block's own flags apply at every d (reflect-101: x[-1] = x[1]).
      first = (flags_TRx1 & _first_flag(a - 1)) != 0
      last = (flags_TRx1 & _last_flag(a - 1)) != 0
      return _CENTER * here + _SIDE * (jnp.where(first, nxt, prev) +
                                       jnp.where(last, prev, nxt))

    x = level(lay.m - 1, 0)
    prev = jnp.dot(x, shift_prev, precision=hi, preferred_element_type=f32)
    nxt = jnp.dot(x, shift_next, precision=hi, preferred_element_type=f32)
    return _CENTER * x + _SIDE * (prev + nxt)

  def score_of(t, flags_TRx1):
    if blur and k > 1:
      return blurred(t, flags_TRx1)
    return joint_at(t, 0) * scale_1x1

  if otsu:
    # Pass 1: the score (blurred joint) and its range over real entries.
    big = jnp.finfo(f32).max

    def range_body(t, carry):
      lo, hi_ = carry
      flags_TRx1 = flags_of(t)
      score = score_of(t, flags_TRx1)
      score_ref[block(t), :] = score
      valid = valid_of(flags_TRx1)
      lo = jnp.minimum(lo, jnp.min(jnp.min(jnp.where(valid, score, big),
                                           axis=1, keepdims=True), axis=0,
                                   keepdims=True))
      hi_ = jnp.maximum(hi_, jnp.max(jnp.max(jnp.where(valid, score, -big),
                                             axis=1, keepdims=True), axis=0,
                                     keepdims=True))
      return lo, hi_

    lo_1x1, hi_1x1 = jax.lax.fori_loop(
        0, lay.num_blocks, range_body,
        (jnp.full((1, 1), big, f32), jnp.full((1, 1), -big, f32)))
    span_1x1 = hi_1x1 - lo_1x1
    safe_span_1x1 = jnp.where(span_1x1 > 0, span_1x1, 1.0)
    sync()

    def bins_at(rows):
      score = score_ref[rows, :]
      bins = jnp.floor((score - lo_1x1) / safe_span_1x1 * NB)
      return jnp.clip(bins, 0, NB - 1).astype(jnp.int32)

    def bins_of(t):
      return bins_at(block(t))

    def real_bins(start, size):
      """int32 [size, Cp]: bins of rows start.., NB on padding."""
      rows = pl.ds(start, size)
      valid = ((flags_ref[rows, :] & _VALID) != 0) & lane_ok_1xC
      return jnp.where(valid, bins_at(rows), NB)

    # Pass 2: lane j of le/bsum = count / sum of bins over entries with
    # bin <= j (so lane NB-1 holds E and the sum of all bins). f32 counts
    # are exact below 2^24 entries.
    bin_1xNB = jax.lax.broadcasted_iota(jnp.int32, (1, NB), 1)
    hist = (_histogram_onehot if lay.backend == "triton" else
            _histogram_sweep)
    le_1xNB, bsum_1xNB = hist(real_bins, layout=lay)
    # Otsu as sampler_grid.otsu_keep: split s = j + 1 (lanes j < NB - 1).
    e = float(k ** lay.m)
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
    split_1x1 = jnp.where(best_1x1 >= 0, first_1x1 + 1, 0)

  # Pass 3: the final grid (steps 5-6), its total, peak and first argmax.
  def final_body(t, carry):
    total_f, peak, argmax = carry
    flags_TRx1 = flags_of(t)
    valid = valid_of(flags_TRx1)
    joint = joint_at(t, 0) * scale_1x1
    keep = valid & (joint >= eps_1x1)
    if otsu:
      keep = keep & (bins_of(t) >= split_1x1)
    divisor = dlead_ref[block(t), :] * dlast_ref[...]
    fin = jnp.where(keep, joint / divisor, 0.0)
    final_ref[block(t), :] = fin
    total_f = total_f + total(fin)
    blk_peak = jnp.max(jnp.max(fin, axis=1, keepdims=True), axis=0,
                       keepdims=True)
    flat = (t * tr + col_TRx1) * k + lane_1xC
    blk_arg = jnp.min(jnp.min(
        jnp.where(valid & (fin == blk_peak), flat, _BIG), axis=1,
        keepdims=True), axis=0, keepdims=True)
    better = blk_peak > peak  # ties keep the earlier (C-order first) block
    return (total_f, jnp.where(better, blk_peak, peak),
            jnp.where(better, blk_arg, argmax))

  total_f_1x1, peak_1x1, argmax_1x1 = jax.lax.fori_loop(
      0, lay.num_blocks, final_body,
      (jnp.zeros((1, 1), f32), jnp.full((1, 1), -1.0, f32),
       jnp.zeros((1, 1), jnp.int32)))

  if greedy:
    idx_1x1, chosen_1x1 = argmax_1x1, peak_1x1
  else:
    idx_1x1, chosen_1x1 = _draw(final_ref, flags_ref, total_f_1x1 * u_1x1,
                                layout=lay, sync=sync)

  prob_1x1 = jnp.where(total_f_1x1 > 0,
                       chosen_1x1 / jnp.where(total_f_1x1 > 0, total_f_1x1,
                                              1.0), 0.0)
  idx_ref[...] = jnp.broadcast_to(idx_1x1, (1, _LANES))
  val_ref[...] = jnp.where(lane_1xL == 0, prob_1x1,
                           jnp.where(lane_1xL == 1, peak_1x1, 0.0))


def _histogram_sweep(real_bins, *, layout: Layout):
  """Cumulative Otsu histogram by NB compare-and-sum sweeps per block (TPU:
  plain VPU work, no gathers, scatters or relayouts). `real_bins(start,
  size)` gives int32 [size, Cp] bins (NB on padding). Returns float32
  [1, NB] x 2: lane j = count and sum of bins over entries with bin <= j."""
  f32 = jnp.float32
  tr = layout.block_rows
  bin_1xNB = jax.lax.broadcasted_iota(jnp.int32, (1, NB), 1)
  total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0,
                            keepdims=True)

  def block_body(t, carry):
    bins = real_bins(pl.multiple_of(t * tr, tr), tr)

    def per_bin(j, carry):
      le_1xNB, bsum_1xNB = carry
      below = bins <= j
      hit = bin_1xNB == j
      le_1xNB = jnp.where(hit, le_1xNB + total(below.astype(f32)), le_1xNB)
      bsum_1xNB = jnp.where(
          hit, bsum_1xNB + total(jnp.where(below, bins, 0).astype(f32)),
          bsum_1xNB)
      return le_1xNB, bsum_1xNB

    return jax.lax.fori_loop(0, NB, per_bin, carry)

  zeros_1xNB = jnp.zeros((1, NB), f32)
  return jax.lax.fori_loop(0, layout.num_blocks, block_body,
                           (zeros_1xNB, zeros_1xNB))


def _histogram_onehot(real_bins, *, layout: Layout):
  """`_histogram_sweep` by one-hot matmuls (GPU tensor cores): with bin =
  16 h + l, counts[h, l] = onehot(h)^T @ onehot(l) over HR rows (N =
  TRITON_HIST_ENTRIES entries) at a time, so registers stay small; 32
  compares per entry instead of NB. 0/1 bf16 operands with f32
  accumulation are exact; so are the prefix sums, done as [16, 16] matmuls
  (IEEE f32) in two levels."""
  f32 = jnp.float32
  hi = jax.lax.Precision.HIGHEST
  side = 16  # NB = side * side
  # Rows per matmul: powers of two, so hr divides TR and hence Rp.
  hr = min(max(1, TRITON_HIST_ENTRIES // layout.lanes), layout.block_rows)
  n = hr * layout.lanes
  iota_Sx1 = jax.lax.broadcasted_iota(jnp.int32, (side, 1), 0)
  iota_1xS = jax.lax.broadcasted_iota(jnp.int32, (1, side), 1)

  def body(i, counts_SxS):
    # Padding has bin NB, whose h = 16 matches no row of the one-hot.
    bins = real_bins(pl.multiple_of(i * hr, hr), hr)
    hot_h_SxN = ((bins.reshape(1, n) // side) == iota_Sx1).astype(
        jnp.bfloat16)
    hot_l_NxS = ((bins.reshape(n, 1) % side) == iota_1xS).astype(
        jnp.bfloat16)
    return counts_SxS + jnp.dot(hot_h_SxN, hot_l_NxS,
                                preferred_element_type=f32)

  counts_SxS = jax.lax.fori_loop(0, layout.rows_pad // hr, body,
                                 jnp.zeros((side, side), f32))
  row_SxS = jax.lax.broadcasted_iota(jnp.int32, (side, side), 0)
  col_SxS = jax.lax.broadcasted_iota(jnp.int32, (side, side), 1)
  upto_SxS = (row_SxS <= col_SxS).astype(f32)    # [l', l]: l' <= l
  before_SxS = (col_SxS < row_SxS).astype(f32)   # [h, h']: h' < h
  ones_SxS = jnp.ones((side, side), f32)

  def cumulative(x_SxS):  # entry (h, l) = sum of x over bins <= 16 h + l
    rows_SxS = jnp.dot(x_SxS, ones_SxS, precision=hi,
                       preferred_element_type=f32)  # row sums, broadcast
    return (jnp.dot(before_SxS, rows_SxS, precision=hi,
                    preferred_element_type=f32) +
            jnp.dot(x_SxS, upto_SxS, precision=hi,
                    preferred_element_type=f32)).reshape(1, NB)

  bin_SxS = (row_SxS * side + col_SxS).astype(f32)
  return cumulative(counts_SxS), cumulative(counts_SxS * bin_SxS)


def _draw(final_ref, flags_ref, target_1x1, *, layout: Layout, sync):
  """Pass 4, sampler_grid.draw_index's inverse CDF in two levels: the first
  row whose running sum exceeds the target (else the last positive row),
  then the same within that row. Returns (flat index, chosen entry)."""
  lay = layout
  tr, cp, k = lay.block_rows, lay.lanes, lay.k
  f32 = jnp.float32
  sync()
  row_TRxTR = jax.lax.broadcasted_iota(jnp.int32, (tr, tr), 0)
  col_TRxTR = jax.lax.broadcasted_iota(jnp.int32, (tr, tr), 1)
  idx_TRx1 = jax.lax.broadcasted_iota(jnp.int32, (tr, 1), 0)
  total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0,
                            keepdims=True)

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
    positive = (rs_TRx1 > 0) & ((flags_ref[rows, :] & _VALID) != 0)
    cand = positive & (pre_TRx1 > target_1x1)
    first = jnp.min(jnp.where(cand, idx_TRx1, tr), axis=0, keepdims=True)
    new = (found == _BIG) & (first < tr)
    sel = idx_TRx1 == first
    found = jnp.where(new, t * tr + first, found)
    f_before = jnp.where(new, total(jnp.where(sel, pre_TRx1 - rs_TRx1, 0.0)),
                         f_before)
    f_cells = jnp.where(new, take_row(fin, sel), f_cells)
    lst = jnp.max(jnp.where(positive, idx_TRx1, -1), axis=0, keepdims=True)
    has = lst >= 0
    sel = idx_TRx1 == lst
    last = jnp.where(has, t * tr + lst, last)
    l_before = jnp.where(has, total(jnp.where(sel, pre_TRx1 - rs_TRx1, 0.0)),
                         l_before)
    l_cells = jnp.where(has, take_row(fin, sel), l_cells)
    return (running + total(rs_TRx1), found, f_before, f_cells, last,
            l_before, l_cells)

  zero = jnp.zeros((1, 1), f32)
  zero_cells = jnp.zeros((1, cp), f32)
  init = (zero, jnp.full((1, 1), _BIG, jnp.int32), zero, zero_cells,
          jnp.zeros((1, 1), jnp.int32), zero, zero_cells)
  _, found, f_before, f_cells, last, l_before, l_cells = jax.lax.fori_loop(
      0, lay.num_blocks, body, init)
  hit = found < _BIG
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


def _vmem_limit(layout: Layout, has_weights: bool) -> int:
  """VMEM bytes to ask for on TPU: the double-buffered input blocks ([R, 1]
  columns take 128 lanes), the two scratch grids, and 50% + 8 MiB for the
  compiler's temporaries; at least 32 MiB, at most 64 MiB (a v7x core).
  K = 50, M = 3 needs ~14 MiB before headroom."""
  column = layout.total_rows * 128 * 4
  grid = layout.total_rows * layout.lanes * 4
  inputs = 2 * column + layout.rows_pad * 128 * 4 + (grid if has_weights
                                                     else 0)
  need = 2 * inputs + 2 * layout.rows_pad * layout.lanes * 4
  return int(min(max(need * 3 // 2 + (8 << 20), 32 << 20), 64 << 20))


@functools.partial(jax.jit, static_argnames=(
    "blur", "otsu", "greedy", "backend", "interpret", "block_rows"))
def grid_threshold_draw(probs_BxMxK: jax.Array, weights, div_BxMxK: jax.Array,
                        u_B: jax.Array, eps_b: jax.Array, *, blur: bool = True,
                        otsu: bool = True, greedy: bool = False,
                        backend: str = "triton", interpret=False,
                        block_rows: int | None = None):
  """Fused steps 3-6 and 8 for one order M >= 2 (a Pallas kernel).

  Args:
    probs_BxMxK: float32 [B, M, K], heads 1..M's top-k marginals.
    weights: None or float32 [B, K, ..., K] (M axes), the co-occurrence
      weights of the grid (gathered by XLA beforehand).
    div_BxMxK: float32 [B, M, K], each head's repetition-penalty factor
      (repetition_penalty where the token was seen, else 1).
    u_B: float32 [B], the uniform of each row's draw (ignored if greedy).
    eps_b: float32 [], the static threshold.
    blur, otsu, greedy: as sampler_grid.threshold_grid / draw_index.
    backend: "tpu" (Mosaic) or "triton" (GPU); fixes layout and lowering.
    interpret: False (compiled), True (interpret: TPU semantics through
      pltpu.InterpretParams for "tpu") or an InterpretParams.
    block_rows: TR, grid rows per block (rounded to the backend's rules).

  Returns:
    (flat_B int32: C-order index of the drawn entry, prob_B float32: its
    probability under the final grid, peak_B float32: the final grid's
    largest entry). All-zero grids give (0, 0, 0).
  """
  b, m, k = probs_BxMxK.shape
  if m < 2:
    raise InputError(f"the grid kernel needs an order M >= 2, got M = {m} "
                     "(order 1 is plain AR, drawn by the caller).")
  lay = make_layout(k, m, backend, block_rows)
  f32 = jnp.float32
  pad_rows = ((0, 0), (lay.halo, lay.rows_pad - lay.rows + lay.halo), (0, 0))
  pad_lanes = ((0, 0), (0, 0), (0, lay.lanes - k))
  probs_BxMxK = probs_BxMxK.astype(f32)
  div_BxMxK = div_BxMxK.astype(f32)
  plead = jnp.pad(_outer(probs_BxMxK[:, :m - 1]).reshape(b, -1, 1), pad_rows)
  plast = jnp.pad(probs_BxMxK[:, m - 1:], pad_lanes)
  dlead = jnp.pad(_outer(div_BxMxK[:, :m - 1]).reshape(b, -1, 1),
                  ((0, 0), (0, lay.rows_pad - lay.rows), (0, 0)),
                  constant_values=1.0)
  dlast = jnp.pad(div_BxMxK[:, m - 1:], pad_lanes, constant_values=1.0)
  lane = jnp.arange(_LANES)
  params = jnp.where(lane == 0, u_B.astype(f32)[:, None],
                     jnp.where(lane == 1, jnp.asarray(eps_b, f32), 0.0))
  inputs = [params[:, None, :], plead, plast, dlead, dlast,
            jnp.asarray(_row_flags(lay))]
  rt, rp, cp = lay.total_rows, lay.rows_pad, lay.lanes
  row_spec = lambda shape: pl.BlockSpec((None,) + shape, lambda i: (i, 0, 0))
  in_specs = [row_spec((1, _LANES)), row_spec((rt, 1)), row_spec((1, cp)),
              row_spec((rp, 1)), row_spec((1, cp)),
              pl.BlockSpec((rp, 1), lambda i: (0, 0))]
  if weights is not None:
    w = weights.astype(f32).reshape(b, lay.rows, k)
    inputs.append(jnp.pad(w, ((0, 0),) + pad_rows[1:2] + ((0, cp - k),)))
    in_specs.append(row_spec((rt, cp)))
  out_shape = [jax.ShapeDtypeStruct((b, 1, _LANES), jnp.int32),
               jax.ShapeDtypeStruct((b, 1, _LANES), f32)]
  out_specs = [row_spec((1, _LANES)), row_spec((1, _LANES))]
  kernel = functools.partial(
      _grid_kernel, layout=lay, has_weights=weights is not None, blur=blur,
      otsu=otsu, greedy=greedy, barrier=backend == "triton" and not interpret)
  if backend == "tpu":
    if interpret is True:
      interpret = pltpu.InterpretParams()
    extra = dict(
        scratch_shapes=[pltpu.VMEM((rp, cp), f32), pltpu.VMEM((rp, cp), f32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",),
            vmem_limit_bytes=_vmem_limit(lay, weights is not None)))
  elif backend == "triton":
    # No scratch memory in Triton: the two buffers are outputs (global).
    out_shape += [jax.ShapeDtypeStruct((b, rp, cp), f32)] * 2
    out_specs += [row_spec((rp, cp))] * 2
    extra = dict(compiler_params=pltriton.CompilerParams(
        num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES))
  else:
    raise ValueError(f"backend {backend!r} unknown; available: {BACKENDS}.")
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b,), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, name=f"dynamo_grid_m{m}",
      **extra)(*inputs)
  idx, val = outs[0], outs[1]
  return idx[:, 0, 0], val[:, 0, 0], val[:, 0, 1]


def grid_threshold_draw_reference(probs_BxMxK: jax.Array, weights,
                                  div_BxMxK: jax.Array, u_B: jax.Array,
                                  eps_b: jax.Array, *, blur: bool = True,
                                  otsu: bool = True, greedy: bool = False):
  """`grid_threshold_draw` in jnp: sampler_grid's functions, called as
  dynamo_sampler.order_grids and backoff_and_draw call them. Same arguments
  (less backend options) and returns."""
  k = probs_BxMxK.shape[2]
  weights = None if weights is None else weights.astype(jnp.float32)
  joint = sampler_grid.joint_grid(probs_BxMxK, weights)
  divisor = _outer(div_BxMxK.astype(jnp.float32))
  grid_BxE = sampler_grid.threshold_grid(joint, divisor, eps_b, blur=blur,
                                         otsu=otsu)
  flat_B, prob_B = sampler_grid.draw_index(grid_BxE, u_B, k=k, greedy=greedy)
  return flat_B, prob_B, jnp.max(grid_BxE, axis=1)
