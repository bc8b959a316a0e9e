"""layers.dense: the one-row bfloat16 product on CPU (two copies of the row).

Reference: the float32 product of the same bf16 values, in numpy. A bf16
product on XLA:CPU is a float32 product of upcast operands, so the only
difference allowed is the order of float32 sums: 1e-5 relative to the
largest output (float32 rounding over D = 97 terms is ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax.model.layers import dense

D, V = 97, 131  # primes: a wrong axis cannot hide


def _operands(rows, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(1, rows, D)), dtype)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.1, dtype)
  return x, w


def _numpy(x, w):
  return np.asarray(x, np.float32) @ np.asarray(w, np.float32)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dense_equals_numpy(rows, dtype):
  x, w = _operands(rows, dtype)
  got = jax.jit(lambda x, w: dense("btd,dv->btv", x, w,
                                   preferred_element_type=jnp.float32))(x, w)
  assert got.shape == (1, rows, V) and got.dtype == jnp.float32
  want = _numpy(x, w)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


def test_dense_one_row_bf16_output_dtype_and_heads_axes():
  """A spec with more axes (the attention output projection's) and a bf16
  result: shapes and values as einsum's."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(5, 7, 11)) * 0.1, jnp.bfloat16)
  got = jax.jit(lambda x, w: dense("bthk,hkd->btd", x, w))(x, w)
  want = jnp.einsum("bthk,hkd->btd", x, w)
  assert got.shape == want.shape == (1, 1, 11) and got.dtype == jnp.bfloat16
  # Both round a float32 sum to bf16: at most one bf16 step (2^-7) apart.
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2 ** -7,
                             atol=1e-6)


def test_dense_lowers_plain_einsum_for_accelerators():
  """Only the CPU lowering duplicates the row: a TPU export of a one-row
  bf16 product holds no two-row tensor, and the program XLA compiles here
  (after its optimisations) still multiplies two rows."""
  x, w = _operands(1, jnp.bfloat16)
  fn = jax.jit(lambda x, w: dense("btd,dv->btv", x, w))
  text = jax.export.export(fn, platforms=["tpu"])(x, w).mlir_module()
  assert "1x2x97" not in text
  cpu = jax.export.export(fn, platforms=["cpu"])(x, w).mlir_module()
  assert "tensor<1x2x97xbf16>" in cpu
  compiled = fn.lower(x, w).compile().as_text()
  dots = [line for line in compiled.splitlines() if " dot(" in line]
  assert dots and all("[2,131]" in line for line in dots), dots
