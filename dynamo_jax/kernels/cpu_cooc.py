"""The co-occurrence lookup of DynaMo's top-k grid as a native CPU kernel.

  grid_bits(table_arrays, ids_BxMxK) -> [int32 [B, K**m] for m = 2..M]: the
      value bits the trie stores for every m-gram of the grid, by the C++
      kernel (`cpu_cooc.cc`, an XLA FFI custom call); the same bits as the
      jnp walk of `dynamo_jax.cooc.lookup` (its reference in the tests).

Chosen explicitly: `cooc.device_table(table, lookup="native")` (or
`DeviceTable(arrays, lookup="native")`) gives a table whose lookups the
sampler and the tree proposals run here; `python -m dynamo_jax bench
--cooc-lookup native` uses it, and experiments/bench_sampler.py /
bench_cooc.py `--native-lookup` time it beside the jnp walk. Built and cached like every native kernel
(kernels/native_build.py); no compiler or a non-CPU backend is an error,
never a fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dynamo_jax.kernels import native_build

TARGET = "dynamo_cooc_lookup"
SOURCE = "cpu_cooc.cc"
_WHAT = "native co-occurrence lookup"
MAX_ORDER = 8  # cpu_cooc.cc: kMaxOrder


def register() -> None:
  """Builds (once per machine) and registers the kernel with XLA:CPU."""
  native_build.register(SOURCE, {TARGET: "DynamoCoocLookup"}, _WHAT)


def check_backend() -> None:
  native_build.check_backend(
      _WHAT, "use the default lookup there (device_table(table)).")


def grid_bits(table_arrays: dict, ids_BxMxK) -> list:
  """[int32 [B, K**m] for m = 2..M]: the stored value bits (0 when absent)
  of every m-gram (ids[b, 0, j_1], .., ids[b, m-1, j_m]), flat index
  j_1 K^(m-1) + .. + j_m."""
  register()
  b, m_heads, k = ids_BxMxK.shape
  levels = [table_arrays[f"order_{m}"] for m in range(2, m_heads + 1)]
  shapes = [jax.ShapeDtypeStruct((b, k**m), jnp.int32)
            for m in range(2, m_heads + 1)]
  call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="sequential")
  return list(call(ids_BxMxK.astype(jnp.int32), table_arrays["root_off"],
                   table_arrays["root_mask"], *levels))
