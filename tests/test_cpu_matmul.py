"""The native few-row CPU matmul (kernels/cpu_rows.cc) and the panel layout.

References: numpy's float64 product for the kernel (tolerance 1e-5 of the
largest output: float32 sums of <= 577 terms round at ~1e-6 relative); the
same model with its weights in the standard layout (XLA's matmuls) for the
packed model, at the whole-model tolerance 1e-4 for logits and token for
token for greedy decoding; AR for DynaMo at eps_b 1, bit for bit.
Dimensions are primes (or a multiple of the 32-column panel plus a prime
rest) so that a wrong axis or a lost remainder cannot hide.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax.decoding.generate import generate
from dynamo_jax.errors import CheckpointError, DynamoError
from dynamo_jax.kernels import cpu_matmul
from dynamo_jax.model.config import tiny_config
from dynamo_jax.model.pythia import (forward, forward_cached, init_cache,
                                     init_params)


def _operands(rows, k, n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(rows, k)).astype(np.float32),
          rng.normal(size=(k, n)).astype(np.float32))


def test_pack_layout_and_inverse():
  _, w = _operands(1, 5, 2 * 32 + 7)
  packed = np.asarray(cpu_matmul.pack(jnp.asarray(w)))
  assert packed.shape == w.shape
  flat = packed.reshape(-1)
  k, n = w.shape
  for p in range(2):  # panel p holds columns 32p..32p+31, row by row
    for row in range(k):
      start = (p * k + row) * 32
      np.testing.assert_array_equal(flat[start:start + 32],
                                    w[row, 32 * p:32 * p + 32])
  np.testing.assert_array_equal(flat[2 * k * 32:].reshape(k, 7), w[:, 64:])
  np.testing.assert_array_equal(
      np.asarray(cpu_matmul.unpack(jnp.asarray(packed))), w)


# N = 577: 18 panels + 1 column, and 775: 24 panels + 7 columns, so the
# product is split between threads (chunks of >= 8 panels); 67: 2 panels +
# 3 columns; 31: the rest block only.
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(37, 67), (37, 31), (61, 577), (29, 775)])
def test_kernel_equals_numpy(rows, k, n):
  x, w = _operands(rows, k, n)
  got = jax.jit(cpu_matmul.rows_matmul)(x, cpu_matmul.pack(jnp.asarray(w)))
  want = x.astype(np.float64) @ w.astype(np.float64)
  assert got.shape == (rows, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  ref = cpu_matmul.rows_matmul_reference(x, cpu_matmul.pack(jnp.asarray(w)))
  np.testing.assert_allclose(np.asarray(ref), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


def test_a_row_does_not_depend_on_the_rows_fed_with_it():
  # What keeps eps_b 1 equal to AR: head 1's row gives the same bits
  # whether it is fed alone (AR) or with the drafts (DynaMo, verified).
  x, w = _operands(17, 61, 577, seed=1)
  packed = cpu_matmul.pack(jnp.asarray(w))
  call = jax.jit(cpu_matmul.rows_matmul)
  together = np.asarray(call(x, packed))
  for r in (0, 3, 8, 16):
    np.testing.assert_array_equal(np.asarray(call(x[r:r + 1], packed))[0],
                                  together[r])
  # Every row count a sweep can have (1..9: the 8-row sweep and a remainder)
  # gives its leading rows the bits they get alone; 577 columns leave a
  # 1-column block after the 32-column panels.
  for rows in range(1, 10):
    np.testing.assert_array_equal(np.asarray(call(x[:rows], packed)),
                                  together[:rows])


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config(vocab_size=331, hidden_size=72, num_heads=4,
                       intermediate_size=149, num_token_heads=3)
  params = init_params(config, 3)
  return config, params, cpu_matmul.pack_params(config, params)


def test_packed_model_logits(tiny):
  config, params, (pconfig, pparams) = tiny
  assert pconfig.weight_layout == "panels"
  ids = np.random.default_rng(0).integers(1, config.vocab_size, (2, 11))
  want = np.asarray(forward(config, params, ids))
  got = np.asarray(forward(pconfig, pparams, ids))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("verified", {}),
                                     ("verified", {"tree": 3})])
def test_packed_model_decodes_as_the_standard_one(tiny, mode, kw):
  config, params, (pconfig, pparams) = tiny
  prompt = np.random.default_rng(1).integers(1, config.vocab_size, (2, 5))
  want = generate(config, params, prompt, max_new_tokens=12, mode=mode,
                  greedy=True, **kw)
  got = generate(pconfig, pparams, prompt, max_new_tokens=12, mode=mode,
                 greedy=True, **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("greedy", [True, False])
def test_packed_dynamo_at_eps_b_one_is_packed_ar(tiny, greedy):
  _, _, (pconfig, pparams) = tiny
  prompt = np.random.default_rng(2).integers(1, pconfig.vocab_size, (2, 5))
  ar = generate(pconfig, pparams, prompt, max_new_tokens=10, mode="ar",
                greedy=greedy, seed=[4, 5])
  dyn = generate(pconfig, pparams, prompt, max_new_tokens=10, mode="dynamo",
                 eps_b=1.0, greedy=greedy, seed=[4, 5])
  np.testing.assert_array_equal(dyn.tokens, ar.tokens)


def test_packed_heads_share_one_unembedding_and_head1_stays_exact(tiny):
  # With the panels, every head is unembedded in one matmul (exact_head1
  # costs nothing there); head 1's logits are still AR's, bit for bit.
  _, _, (pconfig, pparams) = tiny
  ids = np.random.default_rng(3).integers(1, pconfig.vocab_size, (2, 6))
  cache = init_cache(pconfig, 2, 8, all_heads=True)
  step = jax.jit(lambda p, c, t: forward_cached(
      pconfig, p, c, t, all_heads=True, last_only=True))
  heads, _ = step(pparams, cache, ids)
  alone, _ = jax.jit(lambda p, c, t: forward_cached(
      pconfig, p, c, t, last_only=True))(pparams, init_cache(pconfig, 2, 8),
                                         ids)
  np.testing.assert_array_equal(np.asarray(heads[0]), np.asarray(alone))
  text = step.lower(pparams, cache, ids).as_text()
  assert text.count(cpu_matmul.TARGET) == 4 * pconfig.num_layers + 4 * (
      pconfig.num_token_heads - 1) + 1


def test_pack_params_packs_exactly_the_dense_weights(tiny):
  config, params, (_, pparams) = tiny
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  packed = dict(jax.tree_util.tree_flatten_with_path(pparams)[0])
  assert flat.keys() == packed.keys()
  changed = [jax.tree_util.keystr(k) for k in flat
             if not np.array_equal(np.asarray(flat[k]), np.asarray(packed[k]))]
  layers = config.num_layers + config.num_token_heads - 1
  assert len(changed) == 4 * layers + 1  # qkv, out, mlp in/out; embed_out
  assert all(k.endswith(("qkv_kernel']", "out_kernel']", "in_kernel']",
                         "embed_out']")) for k in changed)
  for k in flat:
    assert packed[k].shape == flat[k].shape


def test_dense_panels_refuses_a_misfit():
  x = jnp.ones((1, 2, 5, 3), jnp.float32)
  with pytest.raises(ValueError, match="does not fit"):
    cpu_matmul.dense_panels("bthk,hkd->btd", x, jnp.ones((5, 4, 7)))
  with pytest.raises(ValueError, match="leading axes"):
    cpu_matmul.dense_panels("btd,vd->btv", x[:, :, 0], jnp.ones((7, 3)))


def test_refusals(tiny, tmp_path, monkeypatch):
  config, params, (pconfig, pparams) = tiny
  with pytest.raises(cpu_matmul.NativeKernelError, match="already packed"):
    cpu_matmul.pack_params(pconfig, pparams)
  prompt = np.ones((1, 3), np.int32)
  with monkeypatch.context() as m:
    m.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(cpu_matmul.NativeKernelError, match="CPU kernel"):
      cpu_matmul.pack_params(config, params)
    with pytest.raises(cpu_matmul.NativeKernelError, match="CPU kernel"):
      generate(pconfig, pparams, prompt, max_new_tokens=2)
  bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  with pytest.raises(cpu_matmul.NativeKernelError, match="float32"):
    cpu_matmul.pack_params(bf16, params)
  from dynamo_jax.convert import native  # pylint: disable=import-outside-toplevel
  from dynamo_jax.convert import hf  # pylint: disable=import-outside-toplevel
  with pytest.raises(CheckpointError, match="layout"):
    native.save(pconfig, pparams, str(tmp_path / "packed"))
  with pytest.raises(CheckpointError, match="layout"):
    hf.to_hf(pconfig, pparams, str(tmp_path / "packed_hf"))
  assert not (tmp_path / "packed").exists()
  assert not (tmp_path / "packed_hf").exists()
  # A checkpoint that claims packed weights is refused by name.
  native.save(config, params, str(tmp_path / "plain"))
  cfg_file = tmp_path / "plain" / native.CONFIG_FILE
  meta = json.loads(cfg_file.read_text())
  meta["model"]["weight_layout"] = "panels"
  cfg_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="weight_layout 'panels'"):
    native.load(str(tmp_path / "plain"))
  # A fresh cache and no compiler: an error naming the compiler.
  monkeypatch.setenv("DYNAMO_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(cpu_matmul.NativeKernelError,
                     match="'no-such-compiler-here' was not found"):
    cpu_matmul.build()
  # A compiler that fails: its error is reported, no library is left.
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(cpu_matmul.NativeKernelError, match="failed"):
    cpu_matmul.build()
  assert not list((tmp_path / "cache" / "native").glob("*.so"))
  assert issubclass(cpu_matmul.NativeKernelError, DynamoError)


def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("DYNAMO_CACHE", str(tmp_path))
  first = cpu_matmul.build()
  stamp = first.stat().st_mtime_ns
  assert cpu_matmul.build() == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in (tmp_path / "native").iterdir()] == [first.name]
  # A cached build is used without a compiler.
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  assert cpu_matmul.build() == first
