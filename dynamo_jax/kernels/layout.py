"""The grid kernel's padded, blocked view of one row's K^M grid (static),
its Triton tuning, and the [1, 1] sum every pass uses.

Shape letters (the kernel's): K top-k, M order, R = K^(M-1) grid rows of K
cells (the row index is the C-order position along the first M-1 axes, the
lane index the last axis), TR rows per block, Rp rows padded to a multiple
of TR, Hp halo rows above and below, Rt = Hp + Rp + Hp, Cp lanes (K
padded). Design: kernels/README.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

VALID = 1 << 30  # row flag: a real grid row (not padding)

# Triton tuning, chosen offline (kernels/triton_offline.py: Triton 3.9 and
# ptxas for sm_90a, K = 50, M = 3): 237 registers per thread, no spills,
# 116 KB of shared memory (loads of the next block are pipelined), which
# fits an A100 or H100 but not the ~100 KB of consumer GPUs (num_stages=1
# then). Not timed on a GPU yet.
TRITON_BLOCK_ROWS = 32     # TR
TRITON_HIST_ENTRIES = 512  # entries per one-hot histogram matmul
TRITON_NUM_WARPS = 8
TRITON_NUM_STAGES = 2


def first_flag(axis: int) -> int:
  """Row flag: the row is the first cell along row axis `axis`."""
  return 1 << (2 * axis)


def last_flag(axis: int) -> int:
  """Row flag: the row is the last cell along row axis `axis`."""
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


def row_flags(layout: Layout) -> np.ndarray:
  """int32 [Rp, 1]: per grid row, VALID and first/last-cell bits of each
  row axis (integer division is avoided inside the kernel)."""
  r = np.arange(layout.rows_pad)
  flags = np.where(r < layout.rows, VALID, 0)
  for a, stride in enumerate(layout.strides):
    pos = (r // stride) % layout.k
    flags |= np.where(pos == 0, first_flag(a), 0)
    flags |= np.where(pos == layout.k - 1, last_flag(a), 0)
  return flags.astype(np.int32)[:, None]


def sum_1x1(x: jax.Array) -> jax.Array:
  """[1, 1]: the sum of a 2-D block (lanes first, then rows)."""
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)
