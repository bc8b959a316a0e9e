"""The native co-occurrence lookup (kernels/cpu_cooc.cc).

References: the jnp walk of cooc/lookup.py, bit for bit (both read the same
trie, so any difference is a bug, not rounding), and the binary search of
`grid_weights_numpy` over the table's sorted keys (float64, rtol 1e-6, as in
test_cooc.py); DynaMo's sampler and `generate` with the jnp lookup, every
output equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax import cooc
from dynamo_jax.cooc import hashtrie, lookup
from dynamo_jax.decoding import dynamo_sampler
from dynamo_jax.decoding.generate import generate
from dynamo_jax.errors import DynamoError, InputError
from dynamo_jax.kernels import cpu_cooc, native_build


def _zipf_table(max_order, seed=7, vocab=30):
  gen = np.random.default_rng(seed)
  # Zipf-like ids: frequent n-grams (large sub-tables) beside absent ones.
  p = 1.0 / np.arange(1, vocab + 1)
  p /= p.sum()
  docs = [gen.choice(vocab, gen.integers(1, 400), p=p) for _ in range(40)]
  return cooc.count_ngrams(docs, vocab, max_order, min_count=2)


@pytest.fixture(scope="module")
def table():
  return _zipf_table(4)


def _both(arrays, ids, alpha=1.0):
  fn = jax.jit(lambda a, i, look: lookup.DeviceTable(a, look)
               .grid_weights_orders(i, alpha), static_argnums=2)
  return ([np.asarray(w) for w in fn(arrays, ids, "xla")],
          [np.asarray(w) for w in fn(arrays, ids, "native")])


# B, M, K: one row and several, every order the table holds, a single
# candidate and a large K.
@pytest.mark.parametrize("b,m,k", [(1, 2, 5), (3, 3, 8), (2, 4, 6),
                                   (1, 3, 300), (3, 2, 1)])
def test_native_bits_equal_the_jnp_walk_and_numpy(table, b, m, k):
  arrays = cooc.to_device(table)
  gen = np.random.default_rng(b * 100 + m * 10 + k)
  zipf = 1.0 / np.arange(1, 31)
  ids = gen.choice(30, (b, m, k), p=zipf / zipf.sum()).astype(np.int32)
  ids[0, 0, 0] = 30 + 5  # beyond the vocabulary: its subtree weighs 0
  ids[-1, -1, -1] = -3
  for alpha in (1.0, 0.5):
    ref, got = _both(arrays, jnp.asarray(ids), alpha)
    assert len(got) == m - 1
    for order, (r, g) in enumerate(zip(ref, got), start=2):
      assert g.shape == (b,) + (k,) * order and g.dtype == np.float32
      assert np.array_equal(r.view(np.int32), g.view(np.int32)), order
      if k <= 8:
        np.testing.assert_allclose(
            g, cooc.grid_weights_numpy(table, ids[:, :order], alpha),
            rtol=1e-6, atol=0)
    assert (got[-1] == 0).any() and np.all(got[0][0, 0] == 0)
    if k > 1:  # (with one candidate the valid row may hold no n-gram)
      assert (got[-1] > 0).any()


def test_native_bits_on_grown_sub_tables(monkeypatch):
  # One insertion round leaves many entries unplaced: most sub-tables move
  # (the grow path), so offsets are not in parent order.
  monkeypatch.setattr(hashtrie, "_MAX_ROUNDS", 1)
  table = _zipf_table(3, seed=3)
  arrays = cooc.to_device(table)
  ids = np.random.default_rng(3).integers(0, 30, (2, 3, 8)).astype(np.int32)
  ref, got = _both(arrays, jnp.asarray(ids))
  for r, g in zip(ref, got):
    assert np.array_equal(r.view(np.int32), g.view(np.int32))
  np.testing.assert_allclose(got[1], cooc.grid_weights_numpy(table, ids),
                             rtol=1e-6)


def test_sampler_with_the_native_lookup_is_the_same(table):
  small = cooc.device_table(table, 3)
  native = cooc.device_table(table, 3, lookup="native")
  assert native is cooc.device_table(table, 3, lookup="native")
  assert native.arrays is small.arrays and native.max_order == 3
  sample = jax.jit(dynamo_sampler.dynamo_sample,
                   static_argnames=dynamo_sampler.STATIC_ARGNAMES)
  gen = np.random.default_rng(0)
  # Logits peaked on frequent ids so that grid entries are in the table.
  logits = gen.normal(0, 1, (2, 3, 30)).astype(np.float32)
  logits[..., :6] += 4.0
  history = jnp.asarray(gen.integers(0, 30, (2, 8)), jnp.int32)
  for eps_b in (0.0, 0.2, 0.5):
    outs = [sample(jax.random.split(jax.random.PRNGKey(1), 2),
                   jnp.asarray(logits), history, jnp.array([8, 3]), t, n=3,
                   k=5, temperature=0.7, eps_b=eps_b, repetition_penalty=1.1)
            for t in (small, native)]
    for a, b in zip(*[jax.tree.leaves(o) for o in outs]):
      assert np.array_equal(np.asarray(a), np.asarray(b)), eps_b


@pytest.mark.parametrize("mode,kw", [("dynamo", dict(eps_b=0.3)),
                                     ("verified", dict(tree=4))])
def test_generate_with_the_native_lookup_is_the_same(mode, kw):
  model = dynamo_jax.load()
  prompt = [[5, 17, 99, 260, 31]]
  runs = [generate(model.config, model.params, prompt, mode=mode,
                   max_new_tokens=12, seed=3,
                   cooc=cooc.device_table(model.cooc, lookup=look), **kw)
          for look in ("xla", "native")]
  assert np.array_equal(runs[0].tokens, runs[1].tokens)
  assert np.array_equal(runs[0].accepted, runs[1].accepted)


def test_refusals(table, monkeypatch, tmp_path):
  arrays = cooc.to_device(table, max_order=2)
  with pytest.raises(InputError, match="lookup must be one of"):
    lookup.DeviceTable(arrays, "fast")
  with pytest.raises(InputError, match="lookup must be one of"):
    lookup.grid_weights_orders(arrays, jnp.zeros((1, 2, 3), jnp.int32),
                               lookup="fast")
  # A sub-table past its level is refused, not read.
  token = int(np.argmax(np.asarray(arrays["root_mask"])))  # has bigrams
  assert int(arrays["root_mask"][token]) >= 1
  bad = dict(arrays, root_off=arrays["root_off"].at[token].set(
      arrays["order_2"].shape[0] - 1))
  with pytest.raises(Exception, match="corrupt device table"):
    jax.block_until_ready(lookup.DeviceTable(bad, "native").grid_weights(
        jnp.full((1, 2, 4), token, jnp.int32)))
  with monkeypatch.context() as m:
    m.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(native_build.NativeKernelError, match="CPU kernel"):
      cooc.device_table(table, lookup="native")
  # A fresh cache and no compiler: an error naming the compiler.
  monkeypatch.setenv("DYNAMO_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(native_build.NativeKernelError,
                     match="'no-such-compiler-here' was not found"):
    native_build.build(cpu_cooc.SOURCE, "lookup")
  assert issubclass(native_build.NativeKernelError, DynamoError)
