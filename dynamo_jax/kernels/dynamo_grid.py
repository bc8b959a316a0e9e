"""One order's grid post-processing (Algorithm 1, steps 3-6 and 8) as a
fused Pallas kernel: `grid_threshold_draw`, with its jnp reference
`grid_threshold_draw_reference` (ops/grid.py). Design, backends, exactness
and what was checked: kernels/README.md. Shape letters: B batch, M order,
K top-k; the kernel's layout (R, Rp, Rt, Cp) as in layout.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from dynamo_jax.errors import InputError
from dynamo_jax.kernels import passes
from dynamo_jax.kernels.layout import (TRITON_NUM_STAGES, TRITON_NUM_WARPS,
                                       Layout, make_layout, row_flags)
from dynamo_jax.ops import grid
# The kernel's jnp reference, importable beside it.
from dynamo_jax.ops.grid import (  # pylint: disable=unused-import
    grid_threshold_draw_reference)

BACKENDS = ("tpu", "triton")
_LANES = 128  # the [1, 128] rows that carry scalars in and out
# The custom call a Triton kernel lowers to. jax.export refuses it by default
# (no compatibility guarantee across jaxlib versions): an export for "cuda"
# passes jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL), and
# the artifact is only good for the jaxlib that wrote it.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def _grid_kernel(params_ref,  # [1, 128] f32: lane 0 u, lane 1 eps_b
                 plead_ref,   # [Rt, 1] f32: outer product of heads 1..M-1
                 plast_ref,   # [1, Cp] f32: head M's marginal
                 dlead_ref,   # [Rp, 1] f32: penalty factor of heads 1..M-1
                 dlast_ref,   # [1, Cp] f32: penalty factor of head M
                 flags_ref,   # [Rp, 1] int32: layout.row_flags
                 *refs,       # [w_ref [Rt, Cp] f32 when has_weights],
                              # idx_ref [1, 128] int32 (out: flat index),
                              # val_ref [1, 128] f32 (out: lane 0 p, 1 peak),
                              # score_ref [Rp, Cp] f32 (scratch: blurred),
                              # final_ref [Rp, Cp] f32 (scratch: final grid)
                 layout: Layout, has_weights: bool, blur: bool, otsu: bool,
                 greedy: bool, barrier: bool):
  w_ref = None
  if has_weights:
    w_ref, *refs = refs
  idx_ref, val_ref, score_ref, final_ref = refs
  lane_1xC = jax.lax.broadcasted_iota(jnp.int32, (1, layout.lanes), 1)
  row = passes.RowRefs(layout, plead_ref, plast_ref, w_ref, flags_ref,
                       lane_ok=lane_1xC < layout.k)
  params_1xL = params_ref[...]
  lane_1xL = jax.lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)
  pick = lambda x, i: jnp.sum(jnp.where(lane_1xL == i, x, 0), axis=1,
                              keepdims=True)
  u_1x1, eps_1x1 = pick(params_1xL, 0), pick(params_1xL, 1)
  sync = pltriton.debug_barrier if barrier else (lambda: None)

  scale_1x1 = passes.joint_scale(row)
  otsu_keep = None
  if otsu:
    score_of = passes.scorer(row, scale_1x1, blur=blur)
    bins_at = passes.score_bins(row, score_of, score_ref, sync)
    split_1x1 = passes.otsu_split(row, bins_at)
    otsu_keep = lambda t: bins_at(row.block(t)) >= split_1x1
  total_f_1x1, peak_1x1, argmax_1x1 = passes.final_grid(
      row, dlead_ref, dlast_ref, final_ref, scale_1x1, eps_1x1, otsu_keep)
  if greedy:
    idx_1x1, chosen_1x1 = argmax_1x1, peak_1x1
  else:
    idx_1x1, chosen_1x1 = passes.draw(final_ref, flags_ref,
                                      total_f_1x1 * u_1x1, layout=layout,
                                      sync=sync)

  prob_1x1 = jnp.where(total_f_1x1 > 0,
                       chosen_1x1 / jnp.where(total_f_1x1 > 0, total_f_1x1,
                                              1.0), 0.0)
  idx_ref[...] = jnp.broadcast_to(idx_1x1, (1, _LANES))
  val_ref[...] = jnp.where(lane_1xL == 0, prob_1x1,
                           jnp.where(lane_1xL == 1, peak_1x1, 0.0))


def _vmem_limit(layout: Layout, has_weights: bool) -> int:
  """VMEM bytes to ask for on TPU: the double-buffered input blocks ([R, 1]
  columns take 128 lanes), the two scratch grids, and 50% + 8 MiB for the
  compiler's temporaries; at least 32 MiB, at most 64 MiB (a v7x core).
  K = 50, M = 3 needs ~14 MiB before headroom."""
  column = layout.total_rows * 128 * 4
  grid_bytes = layout.total_rows * layout.lanes * 4
  inputs = 2 * column + layout.rows_pad * 128 * 4 + (grid_bytes if has_weights
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
    blur, otsu, greedy: as ops.grid.threshold_grid / draw_index.
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
  lead = lambda f_BxMxK: grid.outer_product(f_BxMxK[:, :m - 1]).reshape(
      b, -1, 1)  # [B, R, 1]: heads 1..M-1 multiplied out
  plead = jnp.pad(lead(probs_BxMxK), pad_rows)
  plast = jnp.pad(probs_BxMxK[:, m - 1:], pad_lanes)
  dlead = jnp.pad(lead(div_BxMxK),
                  ((0, 0), (0, lay.rows_pad - lay.rows), (0, 0)),
                  constant_values=1.0)
  dlast = jnp.pad(div_BxMxK[:, m - 1:], pad_lanes, constant_values=1.0)
  lane = jnp.arange(_LANES)
  params = jnp.where(lane == 0, u_B.astype(f32)[:, None],
                     jnp.where(lane == 1, jnp.asarray(eps_b, f32), 0.0))
  inputs = [params[:, None, :], plead, plast, dlead, dlast,
            jnp.asarray(row_flags(lay))]
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
