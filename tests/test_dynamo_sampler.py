"""DynaMo sampler against the brute-force numpy reference, and its contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import cooc
from dynamo_jax.decoding import sampler_topk
from dynamo_jax.decoding.dynamo_sampler import STATIC_ARGNAMES, dynamo_sample
from dynamo_jax.decoding.sampling import sample_tokens
from dynamo_jax.errors import InputError
from dynamo_jax.ops import grid
from tests import sampler_reference

PROB_TOL = 1e-6
V = 11  # tiny vocabulary of the dense co-occurrence table (prime)
B = 4
EPS_CHOICES = (0.0, 0.02, 0.1, 0.3, 0.5)


def _tables(seed=0):
  """Random n-gram probabilities over V tokens; ~30% of bigrams and ~40% of
  trigrams absent (probability exactly 0)."""
  rng = np.random.RandomState(seed)
  tables = {1: rng.dirichlet(np.ones(V))}
  for order, absent in ((2, 0.3), (3, 0.4)):
    p = rng.gamma(0.5, size=(V,) * order) * (rng.rand(*(V,) * order) > absent)
    tables[order] = p / p.sum()
  return tables


@jax.tree_util.register_pytree_node_class
class DenseCooc:
  """The co-occurrence protocol over dense tables (a pytree: traced by jit)."""

  def __init__(self, unigram, bigram, trigram):
    self.unigram, self.bigram, self.trigram = unigram, bigram, trigram

  @classmethod
  def from_tables(cls, tables):
    return cls(*(jnp.asarray(tables[i], jnp.float32) for i in (1, 2, 3)))

  def tree_flatten(self):
    return (self.unigram, self.bigram, self.trigram), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  def grid_weights(self, topk_ids_BxMxK, alpha):
    b, m, k = topk_ids_BxMxK.shape
    # ids of position i broadcast along grid axis i.
    idx = tuple(topk_ids_BxMxK[:, i].reshape((b,) + (1,) * i + (k,) +
                                             (1,) * (m - 1 - i))
                for i in range(m))
    joint = (self.bigram if m == 2 else self.trigram)[idx]
    indep = self.unigram[idx[0]]
    for ids in idx[1:]:
      indep = indep * self.unigram[ids]
    ratio = joint / indep
    return jnp.where(joint > 0, ratio ** alpha, 0.0)


class OpaqueCooc:
  """Same weights, but not a pytree: dynamo_sample makes it static."""

  def __init__(self, tables):
    self._dense = DenseCooc.from_tables(tables)

  def grid_weights(self, topk_ids_BxMxK, alpha):
    return self._dense.grid_weights(topk_ids_BxMxK, alpha)


TABLES = _tables()
COOC = DenseCooc.from_tables(TABLES)


def _inputs(rng, *, b=B, heads=3, vocab=V, scale=None):
  """Logits of mixed sharpness (so every m occurs), histories of mixed
  length."""
  scale = scale if scale is not None else rng.choice([1.0, 3.0, 6.0])
  logits = (rng.randn(b, heads, vocab) * scale).astype(np.float32)
  history = rng.randint(0, vocab, size=(b, 6)).astype(np.int32)
  history_len = rng.randint(0, 7, size=b).astype(np.int32)
  return logits, history, history_len


# Plain AR from head 1 as a caller would write it, one key per row or one
# for the batch; and the uniform each row's tuple draw uses (the key contract
# of dynamo_sampler's docstring). Jitted once: eager vmaps are slow to trace.
_row_categorical = jax.jit(jax.vmap(jax.random.categorical))
_batch_categorical = jax.jit(jax.random.categorical)
_row_uniforms = jax.jit(jax.vmap(
    lambda key: jax.random.uniform(jax.random.fold_in(key, 1))))
_batch_uniforms = jax.jit(
    lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (B,)))


def _ar_tokens(keys, logits, temperature, greedy):
  t0 = np.broadcast_to(np.asarray(temperature, np.float32), (3,))[0]
  if greedy:
    return np.asarray(jnp.argmax(logits[:, 0], axis=-1))
  sample = _row_categorical if keys.ndim == 2 else _batch_categorical
  return np.asarray(sample(keys, logits[:, 0] / t0))


def _check_against_reference(seed, trials=5, *, per_row=True, **kw):
  """Runs both sides on `trials` random batches; returns the m seen."""
  rng = np.random.RandomState(seed)
  opts = dict(n=3, k=5, temperature=0.7, alpha=1.0, use_cooc=True, blur=True,
              otsu=True, repetition_penalty=1.1, greedy=False)
  opts.update(kw)
  cooc = opts.pop("cooc", COOC)
  ms = []
  for trial in range(trials):
    logits, history, history_len = _inputs(rng)
    eps_b = EPS_CHOICES[trial % len(EPS_CHOICES)]
    key = jax.random.PRNGKey(100 * seed + trial)
    keys = jax.random.split(key, B) if per_row else key
    got = dynamo_sample(keys, logits, history, history_len, cooc, eps_b=eps_b,
                        **opts)
    ar = _ar_tokens(keys, logits, opts["temperature"], opts["greedy"])
    u = _row_uniforms(keys) if per_row else _batch_uniforms(key)
    want_m, want_tokens, want_p = sampler_reference.reference_sample(
        logits, history, history_len, TABLES if cooc is not None else None,
        eps_b=eps_b, u_B=np.asarray(u), ar_token_B=ar, **opts)
    np.testing.assert_array_equal(np.asarray(got.m_B), want_m)
    np.testing.assert_array_equal(np.asarray(got.tokens_BxN), want_tokens)
    np.testing.assert_allclose(np.asarray(got.joint_prob_B), want_p,
                               atol=PROB_TOL, rtol=0)
    ms.extend(want_m.tolist())
  return set(ms)


def test_full_method_matches_reference_and_covers_every_m():
  assert _check_against_reference(0, trials=10) == {1, 2, 3}


@pytest.mark.parametrize("switch", [
    dict(use_cooc=False), dict(cooc=None), dict(blur=False), dict(otsu=False),
    dict(alpha=0.5), dict(repetition_penalty=1.0), dict(greedy=True),
    dict(temperature=np.float32([0.5, 1.3, 0.9])), dict(n=2), dict(n=1),
    dict(k=V, trials=1), dict(k=1), dict(per_row=False),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_variant_matches_reference(switch):
  # With otsu=False the blur has no effect, so blur=otsu=False needs no case.
  seen_m = _check_against_reference(1, **switch)
  assert max(seen_m) > 1 or switch.get("n") == 1  # tuples were compared too


@pytest.mark.parametrize("on,off", [
    (dict(), dict(use_cooc=False)),
    (dict(), dict(blur=False)),
    (dict(), dict(otsu=False)),
    (dict(), dict(alpha=0.5)),
    (dict(), dict(repetition_penalty=1.0)),
], ids=["use_cooc", "blur", "otsu", "alpha", "repetition_penalty"])
def test_each_switch_changes_behaviour(on, off):
  rng = np.random.RandomState(2)
  differs = False
  for trial in range(12):
    logits, history, history_len = _inputs(rng)
    # The penalty needs history hits among the top tokens to matter.
    history[:, :3] = np.argsort(-logits[:, :3], axis=-1)[:, :, 0]
    history_len = np.maximum(history_len, 3)
    keys = jax.random.split(jax.random.PRNGKey(trial), B)
    eps_b = EPS_CHOICES[trial % len(EPS_CHOICES)]
    common = dict(n=3, k=5, eps_b=eps_b)
    a = dynamo_sample(keys, logits, history, history_len, COOC, **common, **on)
    b = dynamo_sample(keys, logits, history, history_len, COOC, **common,
                      **off)
    differs |= bool(np.any(np.asarray(a.m_B) != np.asarray(b.m_B)) or
                    np.any(np.asarray(a.tokens_BxN) != np.asarray(b.tokens_BxN))
                    or np.any(np.abs(np.asarray(a.joint_prob_B) -
                                     np.asarray(b.joint_prob_B)) > 1e-4))
  assert differs


@pytest.mark.parametrize("per_row,cooc", [
    (True, COOC), (True, None), (False, COOC),
], ids=["row_keys-table", "row_keys-no_table", "one_key-table"])
def test_eps_b_one_is_plain_ar(per_row, cooc):
  # The reference tests' shapes and settings, so compiled programs are shared.
  rng = np.random.RandomState(3)
  for trial, scale in enumerate((0.5, 3.0, 30.0)):  # 30: near point masses
    logits, history, history_len = _inputs(rng, scale=scale)
    key = jax.random.PRNGKey(trial)
    keys = jax.random.split(key, B) if per_row else key
    for temperature in (0.7, np.float32([0.9, 0.5, 1.7])):
      got = dynamo_sample(keys, logits, history, history_len, cooc, n=3, k=5,
                          eps_b=1.0, temperature=temperature)
      np.testing.assert_array_equal(got.m_B, 1)
      np.testing.assert_array_equal(
          got.tokens_BxN[:, 0], _ar_tokens(keys, logits, temperature, False))
      np.testing.assert_array_equal(got.tokens_BxN[:, 1:], 0)


def test_eps_b_one_is_the_ar_decoders_sampler_on_a_real_vocab():
  rng = np.random.RandomState(4)
  logits, history, history_len = _inputs(rng, vocab=1009, scale=4.0)
  keys = jax.random.split(jax.random.PRNGKey(5), B)
  got = dynamo_sample(keys, logits, history, history_len, None, n=3, k=50,
                      eps_b=1.0, temperature=0.7)
  # sampling.sample_tokens is what the AR decoder draws with, same keys.
  want = sample_tokens(keys, jnp.asarray(logits[:, 0]), greedy=False,
                       temperature=0.7)
  np.testing.assert_array_equal(got.tokens_BxN[:, 0], want)
  p = jax.nn.softmax(logits[:, 0] / np.float32(0.7), axis=-1)
  np.testing.assert_allclose(
      got.joint_prob_B, np.asarray(p)[np.arange(B), np.asarray(want)],
      rtol=1e-5)


def test_eps_b_one_greedy_is_argmax_of_head_one():
  rng = np.random.RandomState(6)
  logits, history, history_len = _inputs(rng, scale=30.0)
  keys = jax.random.split(jax.random.PRNGKey(0), B)
  got = dynamo_sample(keys, logits, history, history_len, COOC, n=3, k=5,
                      eps_b=1.0, greedy=True)
  np.testing.assert_array_equal(got.m_B, 1)
  np.testing.assert_array_equal(got.tokens_BxN[:, 0],
                                np.argmax(logits[:, 0], axis=-1))


def test_eps_b_zero_without_table_emits_n():
  rng = np.random.RandomState(7)
  for scale in (0.1, 1.0, 5.0, 50.0, 500.0):  # 500: top-k tails underflow to 0
    logits, history, history_len = _inputs(rng, scale=scale)
    history[:, 0] = np.argmax(logits[:, 0], axis=-1)  # penalise the top-1
    keys = jax.random.split(jax.random.PRNGKey(int(scale)), B)
    got = dynamo_sample(keys, logits, history, np.maximum(history_len, 1),
                        None, n=3, k=5, eps_b=0.0)
    np.testing.assert_array_equal(got.m_B, 3)
    assert np.all(np.asarray(got.joint_prob_B) > 0)


def test_batched_rows_equal_rows_decoded_alone():
  rng = np.random.RandomState(8)
  logits, history, history_len = _inputs(rng)
  keys = jax.random.split(jax.random.PRNGKey(7), B)
  for eps_b in (0.0, 0.1, 0.5):
    batch = dynamo_sample(keys, logits, history, history_len, COOC, n=3, k=5,
                          eps_b=eps_b)
    for row in range(B):
      alone = dynamo_sample(keys[row:row + 1], logits[row:row + 1],
                            history[row:row + 1], history_len[row:row + 1],
                            COOC, n=3, k=5, eps_b=eps_b)
      assert int(alone.m_B[0]) == int(batch.m_B[row])
      np.testing.assert_array_equal(alone.tokens_BxN[0],
                                    batch.tokens_BxN[row])
      np.testing.assert_allclose(alone.joint_prob_B[0],
                                 batch.joint_prob_B[row], atol=PROB_TOL)


def test_opaque_cooc_object_is_static_and_agrees():
  rng = np.random.RandomState(8)
  logits, history, history_len = _inputs(rng)
  keys = jax.random.split(jax.random.PRNGKey(9), B)
  a = dynamo_sample(keys, logits, history, history_len, COOC, n=3, k=5,
                    eps_b=0.02)
  b = dynamo_sample(keys, logits, history, history_len, OpaqueCooc(TABLES),
                    n=3, k=5, eps_b=0.02)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_runs_inside_an_outer_jit_with_everything_traced():
  rng = np.random.RandomState(10)
  logits, history, history_len = _inputs(rng)
  keys = jax.random.split(jax.random.PRNGKey(11), B)
  temperature = np.float32([0.7, 0.9, 1.1])

  @jax.jit
  def step(keys, logits, history, history_len, cooc, temperature, eps_b,
           repetition_penalty):
    return dynamo_sample(keys, logits, history, history_len, cooc, n=3, k=5,
                         temperature=temperature, eps_b=eps_b,
                         repetition_penalty=repetition_penalty)

  for eps_b in (0.0, 0.3):
    args = (keys, logits, history, history_len, COOC)
    kw = dict(temperature=temperature, eps_b=eps_b, repetition_penalty=1.2)
    inner = step(*args, *kw.values())
    outer = dynamo_sample(*args, n=3, k=5, **kw)
    for x, y in zip(inner, outer):
      np.testing.assert_array_equal(x, y)
    # The documented way to jit it directly (what the benchmarks time).
    jitted = jax.jit(dynamo_sample, static_argnames=STATIC_ARGNAMES)
    direct = jitted(*args, n=3, k=5, temperature=jnp.asarray(temperature),
                    eps_b=jnp.float32(eps_b),
                    repetition_penalty=jnp.float32(1.2))
    for x, y in zip(direct, outer):
      np.testing.assert_array_equal(x, y)


def test_blur_and_otsu_pieces_match_reference():
  rng = np.random.RandomState(12)
  cube = rng.rand(1, 6, 6, 6).astype(np.float32) ** 4
  np.testing.assert_allclose(grid.gaussian_blur3(jnp.asarray(cube))[0],
                             sampler_reference._blur(cube[0].astype(float)),
                             rtol=1e-6)
  # Rows: a skewed grid, a constant one (no split: keep all), two values,
  # a grid with an empty gap in the middle of its histogram.
  rows = np.stack([cube.ravel(), np.full(216, 0.3), np.arange(216) % 2,
                   np.where(np.arange(216) < 100, rng.rand(216) * 0.1,
                            0.9 + rng.rand(216) * 0.1)]).astype(np.float32)
  got = grid.otsu_keep(jnp.asarray(rows))
  for row, keep in zip(rows, np.asarray(got)):
    np.testing.assert_array_equal(
        keep, sampler_reference._otsu_keep(row.astype(np.float64)))
  assert got[1].all() and 0 < got[3].sum() < 216


@pytest.mark.parametrize("k", [1, 7, 50])
def test_chunked_top_k_equals_lax_top_k_ties_included(k):
  rng = np.random.RandomState(13)
  # Few distinct values: ties everywhere, also at the k-th place; -inf runs.
  x = rng.randint(0, 6, size=(2, 3, 997)).astype(np.float32)
  x[0, 1, 100:400] = -np.inf
  x[1, 2, :] = -np.inf
  x[1, 0] = rng.randn(997)
  want = jax.lax.top_k(jnp.asarray(x), k)
  got = jax.jit(lambda a: sampler_topk.exact_top_k(a, k, chunk=8))(x)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def _call(**overrides):
  logits = np.zeros((2, 3, V), np.float32)
  args = dict(key=jax.random.PRNGKey(0), logits_BxNxV=logits,
              history_BxHs=np.zeros((2, 4), np.int32),
              history_len_B=np.zeros(2, np.int32), cooc=None)
  opts = dict(n=3, k=5)
  for name, value in overrides.items():
    (args if name in args else opts)[name] = value
  return dynamo_sample(args.pop("key"), *args.values(), **opts)


@pytest.mark.parametrize("overrides,message", [
    (dict(eps_b=-0.1), "eps_b must be"),
    (dict(eps_b=1.5), "eps_b must be"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=np.float32([0.7, 0.0, 0.7])), "temperature must be"),
    (dict(temperature=np.float32([0.7, 0.7])), "temperature must be"),
    (dict(k=V + 1), "k must be"),
    (dict(k=0), "k must be"),
    (dict(n=0), "n must be"),
    (dict(n=4), "n must be"),
    (dict(repetition_penalty=0.9), "repetition_penalty must be"),
    (dict(alpha=-1.0), "alpha must be"),
    (dict(history_len_B=np.int32([0, 5])), "history_len must"),
    (dict(history_BxHs=np.zeros((2, 4), np.float32)), "integer token ids"),
    (dict(eps_b=np.float32([0.5, 0.5])), "eps_b must be a scalar"),
    (dict(key=jax.random.split(jax.random.PRNGKey(0), 3)), "key has shape"),
    (dict(logits_BxNxV=np.zeros((2, V), np.float32)), "logits must be"),
    (dict(cooc=object()), "cooc must be"),
])
def test_bad_arguments_raise_input_error(overrides, message):
  with pytest.raises(InputError, match=message):
    _call(**overrides)


@pytest.mark.parametrize("valid_first", [0, 1, 3, 5, 8])
def test_table_lookup_every_branch_matches_numpy(valid_first):
  """The last trie level probes only parents with children, gathered into
  the smallest branch (lax.switch) that holds them; the number of valid
  first-head ids sets how many there are. Every branch, and the one walk
  for all orders the sampler uses, must give the numpy reference."""
  gen = np.random.default_rng(7)
  p = 1.0 / np.arange(1, 31)
  docs = [gen.choice(30, gen.integers(1, 400), p=p / p.sum())
          for _ in range(40)]
  table = cooc.count_ngrams(docs, 30, 3, min_count=2)
  ids = gen.integers(0, 30, (2, 3, 8)).astype(np.int32)
  ids[:, 0, valid_first:] = 99  # out of the vocabulary: no children
  got = jax.jit(lambda t, x: t.grid_weights_orders(x, 1.0))(
      cooc.device_table(table), jnp.asarray(ids))
  for m, weights in zip((2, 3), got):
    want = cooc.grid_weights_numpy(table, ids[:, :m])
    np.testing.assert_allclose(weights, want, rtol=1e-6, atol=0)
    assert np.array_equal(np.asarray(weights) == 0, want == 0)
    np.testing.assert_array_equal(
        weights, cooc.grid_weights(cooc.to_device(table), ids[:, :m]))
