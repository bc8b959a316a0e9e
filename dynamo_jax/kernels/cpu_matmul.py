"""A native few-row matmul for decoding on CPU, chosen explicitly.

  pack_params(config, params) -> (config, params): the decode-time copy of a
      float32 model whose layer and unembedding weights are in the panel
      layout (`config.weight_layout == "panels"`); `generate` and every
      decoder take the pair as they take the plain one.
  rows_matmul(x_RxK, w_packed_KxN) -> [R, N]: the product, by the C++ kernel
      (`cpu_rows.cc`, an XLA FFI custom call).
  rows_matmul_reference(x_RxK, w_packed_KxN): the same product in jnp, by
      unpacking the weight: the kernel's reference in the tests.
  pack(w_KxN) / unpack(w_packed_KxN): the layout and its inverse.
  dense_weights(params): the weights pack_params packs, as [K, N] matrices.

Why it exists (measured on a 2-core AMD EPYC VM, jax 0.10.2): XLA:CPU
computes a one-row product with a matrix-vector loop and a product of 2..17
rows with a library matmul that costs 2-3x as much per weight inside the
decode loop. A pass that feeds 3 tokens (the verified chain, DynaMo after a
multi-token step) then costs about twice an AR pass although both read the
same weights. The kernel reads each weight once, as one sequential stream,
for up to 8 rows at a time, split by columns between XLA:CPU's threads
(`experiments/bench_rows_matmul.py` measures it).

The kernel is built, cached and registered by `native_build.py` (compiled
on first use with the machine's C++ compiler). No compiler, a failed build
or a non-CPU backend is an error that says so; nothing falls back to XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.kernels import native_build
from dynamo_jax.kernels.native_build import NativeKernelError  # noqa: F401

LANES = 32  # columns per panel (cpu_rows.cc: kLanes)
TARGET = "dynamo_rows_matmul"
SOURCE = "cpu_rows.cc"
_WHAT = "native CPU matmul"
# Weights in the panel layout, by parameter name: how many leading axes of
# the weight are contracted (the K axes; the rest are the N axes). The dense
# specs in model/layers.py and model/pythia.py contract exactly these.
_PACKED = {("qkv_kernel", 4): 1, ("out_kernel", 3): 2, ("in_kernel", 2): 1,
           ("out_kernel", 2): 1, ("embed_out", 2): 1}


def build():
  """The compiled kernel library (built now if not in the cache)."""
  return native_build.build(SOURCE, _WHAT)


def register() -> None:
  """Builds (once per machine) and registers the kernel with XLA:CPU."""
  native_build.register(SOURCE, {TARGET: "DynamoRowsMatmul"}, _WHAT)


def check_backend() -> None:
  native_build.check_backend(
      "native matmul (weight_layout 'panels')",
      "decode with the plain parameters there (XLA's matmuls).")


# ---- the layout ------------------------------------------------------------

def pack(w_KxN):
  """A [K, N] weight in the panel layout (cpu_rows.cc), same shape and dtype."""
  k, n = w_KxN.shape
  np_ = n - n % LANES
  panels = w_KxN[:, :np_].reshape(k, np_ // LANES, LANES).transpose(1, 0, 2)
  flat = jnp.concatenate([panels.reshape(-1), w_KxN[:, np_:].reshape(-1)])
  return flat.reshape(k, n)


def unpack(w_packed_KxN):
  """The inverse of `pack`."""
  k, n = w_packed_KxN.shape
  np_ = n - n % LANES
  flat = w_packed_KxN.reshape(-1)
  panels = flat[:k * np_].reshape(np_ // LANES, k, LANES).transpose(1, 0, 2)
  return jnp.concatenate([panels.reshape(k, np_),
                          flat[k * np_:].reshape(k, n - np_)], axis=1)


def rows_matmul(x_RxK, w_packed_KxN):
  """x [R, K] float32 times a packed [K, N] float32 weight, by the kernel."""
  register()
  r, n = x_RxK.shape[0], w_packed_KxN.shape[1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((r, n), jnp.float32),
                          vmap_method="sequential")
  return call(x_RxK, w_packed_KxN)


def rows_matmul_reference(x_RxK, w_packed_KxN):
  return jnp.matmul(x_RxK, unpack(w_packed_KxN),
                    precision=jax.lax.Precision.HIGHEST)


def dense_panels(spec: str, x, w):
  """`jnp.einsum(spec, x, w)` for a weight in the panel layout: the spec's
  contracted axes lead w (as in every dense of the model)."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  contracted = "".join(c for c in ws if c in xs)
  if (not xs.startswith("bt") or ws[:len(contracted)] != contracted
      or xs[2:] != contracted or out != "bt" + ws[len(contracted):]):
    raise ValueError(f"dense spec {spec!r} does not contract w's leading axes")
  if x.shape[2:] != w.shape[:len(contracted)]:
    raise ValueError(f"dense {spec!r}: x {x.shape} does not fit w {w.shape}")
  kdim = int(np.prod(w.shape[:len(contracted)]))
  ndim = int(np.prod(w.shape[len(contracted):]))
  b, t = x.shape[:2]
  y = rows_matmul(x.reshape(b * t, kdim).astype(jnp.float32),
                  w.reshape(kdim, ndim))
  return y.reshape(b, t, *w.shape[len(contracted):])


def pack_params(config, params):
  """(config with weight_layout "panels", params with every dense weight
  packed): the model then multiplies by the native kernel. float32 models
  only; decode-time only (the kernel has no gradient)."""
  check_backend()
  if config.weight_layout != "standard":
    raise NativeKernelError("these parameters are already packed "
                            f"(weight_layout {config.weight_layout!r}).")
  if config.dtype != "float32" or config.param_dtype != "float32":
    raise NativeKernelError(
        f"the native CPU matmul multiplies float32 weights; this model has "
        f"dtype {config.dtype} / param_dtype {config.param_dtype}. Load it "
        "in float32 or decode with XLA's matmuls.")
  register()

  def pack_leaf(path, value):
    lead = _contracted_axes(path, value)
    if lead is None:
      return value
    shape = np.shape(value)
    return _pack_jit(_as_matrix(value, lead)).reshape(shape)

  packed = jax.tree_util.tree_map_with_path(pack_leaf, params)
  return config.replace(weight_layout="panels"), packed


def _contracted_axes(path, value) -> int | None:
  """How many leading axes a dense weight contracts; None for any other
  parameter."""
  return _PACKED.get((getattr(path[-1], "key", None), np.ndim(value)))


def _as_matrix(value, lead: int):
  shape = np.shape(value)
  return jnp.asarray(value).reshape(int(np.prod(shape[:lead])), -1)


def dense_weights(params) -> list:
  """The dense weights of `params` (standard layout) as [K, N] matrices, in
  the pytree's order: what `pack_params` packs."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [_as_matrix(v, lead) for p, v in leaves
          if (lead := _contracted_axes(p, v)) is not None]


_pack_jit = jax.jit(pack)
