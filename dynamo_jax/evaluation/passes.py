"""One decode pass against the HBM-bandwidth bound: the programs
experiments/bench_step.py times, and the bytes each pass must read.

Programs (jitted here, the cache donated as a user's jitted step does):

  * `AR_PASS`: `decoding.ar.ar_pass`, one plain AR pass (head 1, 1 token per
    row, one draw per row): the body of `generate_ar`'s scan.
  * `T3_PASS`: `decoding.dynamo.decode_step`, one DynaMo pass (model and
    sampler in one program).
  * `MODEL_PASS`: `forward_cached`, the model part of a DynaMo pass with
    `all_heads=True, last_only=True` (and `exact_head1=False` for one
    unembedding matmul for all heads: embed_out read once, not twice).
  * `SAMPLER_PASS`: `decoding.dynamo.sample_with_settings`, the sampler part
    (traced inside its jit, so the sampler's host-side argument checks run
    at trace time and never sync on device values).

Bytes a pass reads (the bound is their sum over the bandwidth):

  * Weights: every leaf's nbytes, except that the input embedding is a
    gather of B x T rows, not a read of the whole [V, D] table (~7% of
    pythia-1.4b). Counting the whole table would inflate the bound; the
    `all_leaves` figure gives that variant too.
  * KV: `Attention` (model/layers.py) attends over the WHOLE cache buffer
    (max_len slots) under a position mask; it does not slice to the filled
    part. So KV bytes = B x slots x cache layers x 2 (k, v) x hidden x
    itemsize, with cache layers L for AR and L + n - 1 for Tn. A benchmark
    that allocates max_len = context + T and resets `end` to the context
    before every call reads what a length-aware attention would.

Bandwidth comes from `hardware.py` (vendor peak figures by
`jax.devices()[0].device_kind`) or an explicit figure; for an unknown device
(any CPU) the bound is None with the reason, never a guess. XLA's own
estimate of the bytes a compiled program touches (`cost_bytes`) is a
cross-check of the hand count.
"""

from __future__ import annotations

import jax
import numpy as np

from dynamo_jax.decoding.ar import ar_pass
from dynamo_jax.decoding.dynamo import decode_step, sample_with_settings
from dynamo_jax.evaluation import hardware
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, forward_cached

AR_PASS = jax.jit(ar_pass, static_argnums=0, static_argnames="greedy",
                  donate_argnums=2)
T3_PASS = jax.jit(decode_step, static_argnums=0, static_argnames="settings",
                  donate_argnums=2)
MODEL_PASS = jax.jit(forward_cached, static_argnums=0,
                     static_argnames=("all_heads", "last_only", "exact_head1"),
                     donate_argnums=2)
SAMPLER_PASS = jax.jit(sample_with_settings, static_argnames=("n", "settings"))


def ar_params(params: Params) -> Params:
  """Head 1 alone: the same arrays without the extra token heads."""
  return {k: v for k, v in params.items() if not k.startswith("heads_")}


def nbytes(tree) -> int:
  """Bytes of every leaf (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def weight_bytes(params: Params, batch: int, chunk: int) -> dict[str, int]:
  """Bytes of weights one pass reads: all leaves, except that only the
  B x T gathered rows of the input embedding are read."""
  every = nbytes(params)
  table = params["embed_in"]["embedding"]
  rows = batch * chunk * table.shape[1] * np.dtype(table.dtype).itemsize
  return {"read": every - nbytes(table) + int(rows), "all_leaves": every}


def kv_bytes(config: PythiaConfig, batch: int, slots: int, layers: int,
             itemsize: int) -> int:
  """K and V bytes attention reads: `slots` positions of `layers` caches."""
  return int(batch * slots * layers * 2 * config.hidden_size * itemsize)


def bound_seconds(bytes_read: int, gbs: float | None) -> float | None:
  """Seconds to read `bytes_read` at `gbs` GB/s (None without a bandwidth)."""
  return None if gbs is None else bytes_read / (gbs * 1e9)


def device_bandwidth(kind: str, override_gbs: float | None):
  """(GB/s or None, where it came from or why it is missing)."""
  if override_gbs is not None:
    return float(override_gbs), "--bandwidth-gbs"
  gbs, entry = hardware.lookup(kind, hardware.BANDWIDTH_GBS,
                               hardware.BANDWIDTH_EXACT_GBS)
  if gbs is not None:
    return gbs, f"table ({entry})"
  return None, (f"device_kind {kind!r} is not in the bandwidth table; pass "
                "--bandwidth-gbs to get a bound")


def cost_bytes(compiled) -> float | None:
  """XLA's estimate of bytes a compiled program touches, if available."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "bytes accessed" not in cost:
    return None
  return float(cost["bytes accessed"])
