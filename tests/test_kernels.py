"""The Pallas grid kernel (dynamo_jax/kernels) against its jnp reference.

`KernelTest` holds every case; `TestKernelInterpret` runs them with the
Triton layout in interpret mode, `TestTpuInterpretKernel` with TPU
semantics (pltpu.InterpretParams), and `TestCompiledKernel` compiled on
this machine's TPU or GPU (skipped on CPU). Cases: k in {8, 50}, orders
m in {1 (back-off), 2, 3}, batch in {1, 8}, ties, fully masked grids;
same m and tokens as the reference, probabilities within 1e-5. The
reference is kernel="reference" (ops.grid, the path dynamo_sample runs by
default); a test pins it to the brute-force numpy sampler
(tests/sampler_reference.py).

Shapes are shared across cases so each kernel variant compiles once per
class (interpret mode compiles are the bulk of this file's runtime).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax.decoding import dynamo_sampler
from dynamo_jax.errors import InputError
from dynamo_jax.kernels import dynamo_grid
from dynamo_jax.kernels import threshold_and_draw
from dynamo_jax.ops import grid
from tests import sampler_reference

PROB_TOL = 1e-5
EPS_CHOICES = (0.0, 1e-3, 0.02, 0.1)


def _marginals(rng, b, n, k, *, ties=False):
  """(ids, probs, seen): descending top-k marginals of mixed sharpness."""
  logits = rng.randn(b, n, k) * rng.choice([1.0, 3.0, 6.0], size=(b, n, 1))
  if ties:  # whole-number logits: many equal marginals, hence equal entries
    logits = np.round(logits / 2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = -np.sort(-(p / p.sum(-1, keepdims=True)), axis=-1)
  ids = np.stack([np.stack([rng.permutation(1000)[:k] for _ in range(n)])
                  for _ in range(b)])
  seen = rng.rand(b, n, k) < 0.2
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(p, jnp.float32),
          jnp.asarray(seen))


def _weights(rng, b, n, k, *, ties=False, masked_rows=()):
  """Per order 2..n: [B, K, ..., K] weights, ~half exactly 0 (the mask);
  small whole numbers with ties; all 0 on `masked_rows`."""
  out = []
  for m in range(2, n + 1):
    shape = (b,) + (k,) * m
    if ties:
      w = rng.randint(0, 3, size=shape).astype(np.float32)
    else:
      w = rng.gamma(0.5, size=shape) * (rng.rand(*shape) > 0.5)
    w[list(masked_rows)] = 0.0
    out.append(jnp.asarray(w, jnp.float32))
  return out


def _assert_same(got, want):
  np.testing.assert_array_equal(got.m_B, want.m_B)
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  np.testing.assert_array_equal(got.passed_BxN, want.passed_BxN)
  np.testing.assert_allclose(got.joint_prob_B, want.joint_prob_B,
                             atol=PROB_TOL, rtol=0)
  np.testing.assert_allclose(got.peak_BxN, want.peak_BxN, atol=PROB_TOL,
                             rtol=0)


_STATIC = ("blur", "otsu", "greedy")
_reference = jax.jit(functools.partial(threshold_and_draw, kernel="reference"),
                     static_argnames=_STATIC)


@functools.cache
def _pallas(backend, interpret, block_rows):
  """The kernel path, jitted once per setting. Interpret-mode programs are
  compiled at XLA's -O0: half the compile time, and they run in ms."""
  options = {"xla_backend_optimization_level": 0} if interpret else None
  return jax.jit(functools.partial(
      threshold_and_draw, kernel="pallas", backend=backend,
      interpret=interpret, block_rows=block_rows), static_argnames=_STATIC,
                 compiler_options=options)


class KernelTest:
  """Every case, Triton layout, interpret mode."""
  BACKEND = "triton"
  INTERPRET = True
  # Rows per block for K = 50, M = 3 (2500 rows): several blocks, few loop
  # trips in interpret mode. None elsewhere: the backend's default.
  BIG_BLOCK = 512

  def run(self, *args, block_rows=None, **kw):
    got = _pallas(self.BACKEND, self.INTERPRET, block_rows)(*args, **kw)
    want = _reference(*args, **kw)
    _assert_same(got, want)
    return want

  @pytest.mark.parametrize("k,n,b,trials", [(8, 3, 8, 4), (50, 3, 8, 3),
                                             (50, 2, 1, 4)])
  def test_random_matches_reference(self, k, n, b, trials):
    # K = 8: blocks of 16 rows (4 blocks at M = 3); K = 50, M = 3: 2500 rows.
    block_rows = 16 if k == 8 else self.BIG_BLOCK
    rng = np.random.RandomState(k + n + b)
    ms = set()
    for trial, eps_b in enumerate(EPS_CHOICES[:trials]):
      ids, probs, seen = _marginals(rng, b, n, k, ties=trial == 1)
      weights = _weights(rng, b, n, k, ties=trial == 1,
                         masked_rows=[0] if trial == 2 else [])
      u = jnp.asarray(rng.rand(b), jnp.float32)
      want = self.run(ids, probs, seen, weights, jnp.float32(eps_b),
                      jnp.float32(1.1), u, block_rows=block_rows)
      ms |= set(np.asarray(want.m_B).tolist())
    if b > 1:  # both the back-off and the top order occurred
      assert {1, n} <= ms

  def test_fully_masked_grids(self):
    rng = np.random.RandomState(5)
    ids, probs, seen = _marginals(rng, 8, 3, 8)
    # All-zero weights (every n-gram absent), and eps_b above every entry.
    for weights, eps_b in ((_weights(rng, 8, 3, 8, masked_rows=range(8)), 0.0),
                           (_weights(rng, 8, 3, 8), 1.0)):
      u = jnp.asarray(rng.rand(8), jnp.float32)
      want = self.run(ids, probs, seen, weights, jnp.float32(eps_b),
                      jnp.float32(1.1), u, block_rows=16)
      np.testing.assert_array_equal(want.m_B, 1)
      np.testing.assert_array_equal(want.tokens_BxN, 0)

  def test_greedy_with_ties(self):
    # K = 50, M = 2 in blocks of 16 rows: ties across blocks.
    rng = np.random.RandomState(4)
    for trial in range(3):
      ids, probs, seen = _marginals(rng, 8, 2, 50, ties=True)
      weights = _weights(rng, 8, 2, 50, ties=True, masked_rows=[1])
      if trial == 0:  # constant grid: every entry ties
        probs = jnp.full_like(probs, 1 / 50)
        seen = jnp.zeros_like(seen)
        weights = [jnp.ones_like(w) for w in weights]
      u = jnp.asarray(rng.rand(8), jnp.float32)
      want = self.run(ids, probs, seen, weights,
                      jnp.float32(EPS_CHOICES[trial]), jnp.float32(1.1), u,
                      greedy=True, block_rows=16)
      if trial == 0:  # a constant grid's first maximum is entry 0
        np.testing.assert_array_equal(want.tokens_BxN, ids[:, :, 0])

  @pytest.mark.parametrize("switch", [
      dict(blur=False, weights=None), dict(otsu=False),
  ], ids=["no_blur-no_cooc", "no_otsu"])
  def test_switches(self, switch):
    rng = np.random.RandomState(6)
    switch = dict(switch)
    for trial in range(2):
      ids, probs, seen = _marginals(rng, 8, 2, 8)
      weights = [None] if "weights" in switch else _weights(rng, 8, 2, 8)
      u = jnp.asarray(rng.rand(8), jnp.float32)
      self.run(ids, probs, seen, weights, jnp.float32(EPS_CHOICES[trial]),
               jnp.float32(1.1), u, block_rows=16,
               **{k: v for k, v in switch.items() if k != "weights"})

  def test_order_one_only(self):
    rng = np.random.RandomState(7)
    ids, probs, seen = _marginals(rng, 8, 1, 8)
    want = self.run(ids, probs, seen, [], jnp.float32(0.1), jnp.float32(1.1),
                    jnp.asarray(rng.rand(8), jnp.float32))
    np.testing.assert_array_equal(want.m_B, 1)


class TestKernelInterpret(KernelTest):
  pass


class TestTpuInterpretKernel(KernelTest):
  """The same cases with TPU semantics (Mosaic layout, VMEM scratch)."""
  BACKEND = "tpu"


class TestCompiledKernel(KernelTest):
  """The same cases compiled for this machine's accelerator."""
  BACKEND = None
  INTERPRET = False
  BIG_BLOCK = None

  @pytest.fixture(autouse=True)
  def _needs_accelerator(self):
    if jax.default_backend() not in ("gpu", "tpu"):
      pytest.skip(f"needs a TPU or GPU to compile the kernel; this machine's "
                  f"JAX backend is {jax.default_backend()!r} (the interpret "
                  "classes cover it here)")


def test_reference_matches_brute_force():
  """kernel="reference" (the jnp op behind every order) against the
  brute-force numpy sampler, on the sampler's own top-k marginals."""
  rng = np.random.RandomState(8)
  b, n, k, v = 8, 3, 8, 101
  logits = jnp.asarray(rng.randn(b, n, v) * 3, jnp.float32)
  history = jnp.asarray(rng.randint(0, v, size=(b, 6)), jnp.int32)
  ids, probs, seen = dynamo_sampler.topk_marginals(
      logits, jnp.full((n,), 0.7, jnp.float32), history,
      jnp.full((b,), 6, jnp.int32), k=k)
  weights = _weights(rng, b, n, k)
  keys = jax.random.split(jax.random.PRNGKey(0), b)
  u = dynamo_sampler.tuple_uniforms(keys, b, per_row=True)

  ms = set()
  for eps_b in (0.0, 0.02, 0.6):
    eps, rp = jnp.float32(eps_b), jnp.float32(1.1)
    m, tokens, prob, passed, peak = sampler_reference.reference_orders(
        ids, probs, seen, weights, eps, rp, np.asarray(u))
    got = _reference(ids, probs, seen, weights, eps, rp, u)
    np.testing.assert_array_equal(got.m_B, m)
    np.testing.assert_array_equal(got.passed_BxN, passed)
    # float32 on one side, float64 on the other.
    np.testing.assert_allclose(got.peak_BxN, peak, rtol=1e-6, atol=0)
    tuples = np.asarray(m) > 1
    np.testing.assert_array_equal(np.asarray(got.tokens_BxN)[tuples],
                                  np.asarray(tokens)[tuples])
    np.testing.assert_allclose(np.asarray(got.joint_prob_B)[tuples],
                               np.asarray(prob)[tuples], rtol=1e-6, atol=0)
    ms |= set(np.asarray(m).tolist())
  assert {1, 3} <= ms


def test_no_silent_fallback():
  rng = np.random.RandomState(9)
  ids, probs, seen = _marginals(rng, 2, 2, 8)
  args = (ids, probs, seen, _weights(rng, 2, 2, 8), 0.1, 1.1,
          jnp.full((2,), 0.5, jnp.float32))
  with pytest.raises(InputError, match="unknown"):
    threshold_and_draw(*args, kernel="fast")
  with pytest.raises(InputError, match="unknown"):
    threshold_and_draw(*args, kernel="pallas", backend="mosaic_gpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(InputError, match="needs a TPU or GPU"):
      threshold_and_draw(*args, kernel="pallas", interpret=False)
  else:
    other = "triton" if jax.default_backend() == "tpu" else "tpu"
    with pytest.raises(InputError, match="cannot compile"):
      threshold_and_draw(*args, kernel="pallas", backend=other)
  with pytest.raises(InputError, match="one entry"):
    threshold_and_draw(*args[:3], [], *args[4:], kernel="pallas")


_EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(
    dynamo_grid.TRITON_CUSTOM_CALL)]  # Triton's call has no stable ABI
_TARGET = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_exports_for_accelerators(platform):
  """The jitted kernel path (all orders of a T3 step, k = 50), traced on
  this CPU machine, lowers to Mosaic TPU / Triton: the backend is chosen
  when lowering, so the export holds the compiled kernel, not the
  interpreter."""
  b, n, k = 4, 3, 50
  fn = jax.jit(functools.partial(threshold_and_draw, kernel="pallas"))
  s = jax.ShapeDtypeStruct
  args = (s((b, n, k), jnp.int32), s((b, n, k), jnp.float32),
          s((b, n, k), jnp.bool_),
          [s((b,) + (k,) * m, jnp.float32) for m in range(2, n + 1)],
          s((), jnp.float32), s((), jnp.float32), s((b,), jnp.float32))
  exported = jax.export.export(fn, platforms=[platform],
                               disabled_checks=_EXPORT_CHECKS)(*args)
  text = exported.mlir_module()
  assert exported.platforms == (platform,)
  assert text.count(_TARGET[platform]) >= 2  # one kernel per order m = 2, 3
  assert "stablehlo.while" not in text  # no interpret-mode loops


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_step_exports_with_kernel(platform):
  """The jitted DynaMo decode step with kernel="pallas" exports for TPU and
  GPU from this CPU machine."""
  from dynamo_jax.decoding.dynamo import SamplerSettings, decode_step
  from dynamo_jax.model import init_cache, init_params, tiny_config
  config = tiny_config(vocab_size=211, hidden_size=24, num_heads=3,
                       intermediate_size=97, num_token_heads=3,
                       max_position_embeddings=128)
  b, s_len = 2, 32
  step = jax.jit(functools.partial(
      decode_step, config, settings=SamplerSettings(k=50, kernel="pallas")))
  s = jax.ShapeDtypeStruct
  params = jax.eval_shape(lambda: init_params(config, 0))
  cache = jax.eval_shape(lambda: init_cache(config, b, s_len, all_heads=True))
  exported = jax.export.export(step, platforms=[platform],
                               disabled_checks=_EXPORT_CHECKS)(
      params, cache, s((b, 3), jnp.int32), s((b,), jnp.int32),
      s((b, 2), jnp.uint32), s((b, 16), jnp.int32), s((b,), jnp.int32))
  assert exported.mlir_module().count(_TARGET[platform]) >= 2


@jax.tree_util.register_pytree_node_class
class _ModCooc:
  """Co-occurrence weights in {0, 1, 2} from the tokens' ids (a third of
  the n-grams absent); a pytree, so generate's jit traces it."""

  def __init__(self, mult_N):
    self.mult_N = mult_N  # int32 [N]: weight of each position's id

  def tree_flatten(self):
    return (self.mult_N,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  def grid_weights(self, ids_BxMxK, alpha):
    del alpha
    b, m, k = ids_BxMxK.shape
    code = sum(ids_BxMxK[:, i].reshape((b,) + (1,) * i + (k,) +
                                       (1,) * (m - 1 - i)) * self.mult_N[i]
               for i in range(m))
    return (code % 3).astype(jnp.float32)


def test_generate_pallas_equals_reference():
  """generate(kernel="pallas") decodes the same tokens in the same passes as
  kernel="reference" (a tiny random T3; the kernel in interpret mode here)."""
  import dynamo_jax
  from dynamo_jax.model import tiny_config
  from tests.conftest import random_params
  config = tiny_config(vocab_size=211, hidden_size=24, num_heads=3,
                       intermediate_size=97, num_token_heads=3,
                       max_position_embeddings=128)
  params = random_params(config)
  prompt = np.random.RandomState(10).randint(0, 211, size=(2, 5))
  # Sampling only (two compiles of the decode loop); greedy's argmax is
  # covered kernel-side by test_greedy_with_ties.
  outs = [dynamo_jax.generate(
      config, params, prompt, max_new_tokens=12, mode="dynamo", eps_b=0.02,
      seed=[3, 4], cooc=_ModCooc(jnp.array([7, 13, 19])), k=8, kernel=kernel)
          for kernel in ("reference", "pallas")]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_array_equal(outs[0].accepted, outs[1].accepted)
  assert outs[0].forward_passes == outs[1].forward_passes
  assert outs[0].accepted.max() > 1  # tuples were drawn, not only AR


def test_reference_skips_grids_without_a_candidate_exactly():
  """grid_threshold_draw_reference skips blur, Otsu and the draw when no
  entry reaches eps_b; its outputs must equal the full computation's."""
  rng = np.random.RandomState(10)
  _, probs, seen = _marginals(rng, 4, 3, 8)
  weights = _weights(rng, 4, 3, 8)[1]
  div = jnp.where(seen, 1.1, 1.0)
  u = jnp.asarray(rng.rand(4), jnp.float32)
  for eps_b in (0.0, 0.05, 0.3, 0.9, 1.0):
    eps = jnp.float32(eps_b)
    for greedy in (False, True):
      got = grid.grid_threshold_draw_reference(probs, weights, div, u, eps,
                                               greedy=greedy)
      final = grid.threshold_grid(
          grid.joint_grid(probs, weights), grid.outer_product(div), eps,
          blur=True, otsu=True)
      want = grid.draw_index(final, u, k=8, greedy=greedy) + (
          jnp.max(final, axis=1),)
      for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
