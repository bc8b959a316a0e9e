"""DynaMo and verified decoding against AR decoding and the uncached forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.decoding.dynamo import SamplerSettings, decode_step
from dynamo_jax.errors import InputError
from dynamo_jax.model import forward_cached, init_cache, tiny_config
from tests.conftest import random_params

LOGIT_TOL = 1e-4


def test_eps_b_one_is_ar(t3, rng):
  config, params = t3
  prompt = rng.randint(0, 211, size=(3, 6))
  for seed in (0, 1, [5, 6, 7]):
    ar = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                             seed=seed)
    dyn = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                              mode="dynamo", eps_b=1.0, seed=seed)
    np.testing.assert_array_equal(dyn.tokens, ar.tokens)
    assert dyn.forward_passes == 24 and (dyn.accepted == 1).all()
  greedy = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                               mode="dynamo", eps_b=1.0, greedy=True)
  ar_greedy = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                                  greedy=True)
  np.testing.assert_array_equal(greedy.tokens, ar_greedy.tokens)


def test_eps_b_one_is_ar_in_bfloat16(t3, rng):
  """bf16 DynaMo feeds the n-padded chunk (no one-token branch; dynamo_body)
  and one-row products take two rows on CPU (layers.dense): eps_b 1 must
  still draw AR's tokens, sampled and greedy, with the exact head 1."""
  config, params = t3
  config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  prompt = rng.randint(0, 211, size=(2, 5))
  # Batch 1 (one-row products: the two-row path on CPU) and batch 2.
  for rows in (prompt[:1], prompt[1:], prompt):
    for greedy in (False, True):
      kw = dict(max_new_tokens=16, seed=list(range(len(rows))), greedy=greedy)
      ar = dynamo_jax.generate(config, params, rows, **kw)
      dyn = dynamo_jax.generate(config, params, rows, mode="dynamo",
                                eps_b=1.0, **kw)
      np.testing.assert_array_equal(dyn.tokens, ar.tokens)


def test_eps_b_zero_emits_n_every_pass(t3, rng):
  config, params = t3
  out = dynamo_jax.generate(config, params, rng.randint(0, 211, size=(2, 4)),
                            max_new_tokens=30, mode="dynamo", eps_b=0.0)
  assert out.forward_passes == 10
  assert (out.accepted == 3).all() and out.tokens_per_pass == 3.0


def test_verified_greedy_equals_ar_greedy(trained_t3, t3, rng):
  for config, params in (trained_t3, t3):
    for length, new in ((1, 40), (5, 33), (17, 50)):
      prompt = rng.randint(0, config.vocab_size - 1, size=(4, length))
      ar = dynamo_jax.generate(config, params, prompt, max_new_tokens=new,
                               greedy=True)
      ver = dynamo_jax.generate(config, params, prompt, max_new_tokens=new,
                                mode="verified", greedy=True)
      np.testing.assert_array_equal(ver.tokens, ar.tokens)
  # Trained heads are accepted: far fewer passes than AR's one per token.
  config, params = trained_t3
  prompt = (np.arange(8)[None] * np.array([[1], [2], [3]])) % 31
  ver = dynamo_jax.generate(config, params, prompt, max_new_tokens=60,
                            mode="verified", greedy=True)
  assert ver.forward_passes <= 30 and ver.tokens_per_pass > 2.0


def test_dynamo_on_trained_heads_emits_several_tokens(trained_t3):
  config, params = trained_t3
  prompt = (np.arange(8)[None] * np.array([[1], [2], [3]])) % 31
  out = dynamo_jax.generate(config, params, prompt, max_new_tokens=60,
                            mode="dynamo", eps_b=0.3, temperature=0.7, k=8)
  assert out.tokens_per_pass > 2.0 and out.forward_passes < 30
  # The emitted continuation follows the pattern (heads are right).
  ref = dynamo_jax.generate(config, params, prompt, max_new_tokens=60,
                            greedy=True)
  assert np.mean(out.tokens == ref.tokens) > 0.8


def _exact_two_token_distribution(config, params, prompt, temperature):
  """AR's exact distribution of the first two new tokens, [V, V]."""
  v = config.vocab_size
  first = jax.nn.softmax(dynamo_jax.forward(config, params, prompt)[0, -1]
                         / temperature)
  seqs = np.concatenate([np.repeat(prompt, v, 0), np.arange(v)[:, None]], 1)
  second = jax.nn.softmax(dynamo_jax.forward(config, params, seqs)[:, -1]
                          / temperature, axis=-1)
  return np.asarray(first)[:, None] * np.asarray(second)


def test_verified_sampling_has_ar_distribution():
  """Chi-square test of 6000 verified samples of (t1, t2) against AR's exact
  distribution; AR's own samples pass the same test (a control)."""
  from scipy import stats
  config = tiny_config(vocab_size=7, hidden_size=16, num_heads=2,
                       intermediate_size=32, num_token_heads=3)
  params = random_params(config, seed=3, scale=0.5)
  prompt = np.array([[1, 4, 2]])
  # float64 and normalised: scipy's chisquare checks that observed and
  # expected totals agree to 1e-8 relative, which float32 sums miss.
  exact = _exact_two_token_distribution(config, params, prompt,
                                        0.7).ravel().astype(np.float64)
  exact /= exact.sum()
  n = 6000
  seeds = list(range(n))
  prompts = np.repeat(prompt, n, 0)
  pvalues = {}
  for mode in ("verified", "ar"):
    out = dynamo_jax.generate(config, params, prompts, max_new_tokens=2,
                              mode=mode, seed=seeds, temperature=0.7)
    if mode == "verified":
      # Drafts were both accepted and rejected: the residual path ran.
      assert 0.05 < np.mean(out.accepted[:, 1] >= 2) < 0.95
    cells = out.tokens[:, 0] * 7 + out.tokens[:, 1]
    observed = np.bincount(cells, minlength=49)
    keep = exact * n >= 5  # pool cells too rare for the chi-square test
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum())
    exp *= obs.sum() / exp.sum()  # the observed total, in float64
    pvalues[mode] = stats.chisquare(obs, exp).pvalue
  assert pvalues["ar"] > 1e-3 and pvalues["verified"] > 1e-3, pvalues
  # The test can fail: head 2's marginal is not AR's second-token law.
  assert np.abs(exact.reshape(7, 7).sum(0) - np.asarray(jax.nn.softmax(
      dynamo_jax.forward(config, params, prompt, all_heads=True)[1, 0, -1]
      / 0.7))).max() > 0.05


@pytest.mark.parametrize("mode", ["dynamo", "verified"])
def test_batched_equals_each_row_alone(t3, rng, mode):
  config, params = t3
  prompt = rng.randint(0, 211, size=(3, 5))
  seeds = [11, 22, 33]
  kw = dict(max_new_tokens=20, mode=mode, temperature=0.7)
  if mode == "dynamo":
    kw["eps_b"] = 0.05  # low enough that rows emit different m
  batched = dynamo_jax.generate(config, params, prompt, seed=seeds, **kw)
  for r in range(3):
    alone = dynamo_jax.generate(config, params, prompt[r:r + 1],
                                seed=[seeds[r]], **kw)
    np.testing.assert_array_equal(batched.tokens[r], alone.tokens[0])
    active = batched.accepted[r][batched.accepted[r] > 0]
    np.testing.assert_array_equal(active, alone.accepted[0][alone.accepted[0] > 0])
  if mode == "dynamo":
    assert len({tuple(a) for a in batched.accepted.tolist()}) > 1


def test_cached_heads_equal_uncached(t3, rng):
  config, params = t3
  seq = rng.randint(0, 211, size=(2, 30))
  full = np.asarray(dynamo_jax.forward(config, params, seq, all_heads=True))
  cache = init_cache(config, 2, 40, all_heads=True)
  got, pos = [], 0
  for size in (7, 3, 3, 1, 3, 2, 3, 3, 3, 2):
    logits, cache = forward_cached(config, params, cache,
                                   jnp.asarray(seq[:, pos:pos + size]),
                                   all_heads=True)
    got.append(np.asarray(logits))
    pos += size
  assert pos == 30
  assert np.abs(np.concatenate(got, axis=2) - full).max() <= LOGIT_TOL
  # last_only: each row's last valid position of a chunk, rows of different
  # lengths (what decode_step unembeds).
  cache = init_cache(config, 2, 40, all_heads=True)
  _, cache = forward_cached(config, params, cache, jnp.asarray(seq[:, :10]),
                            all_heads=True)
  lengths = jnp.asarray([3, 1], jnp.int32)
  last, _ = forward_cached(config, params, cache, jnp.asarray(seq[:, 10:13]),
                           lengths, all_heads=True, last_only=True)
  assert last.shape == (3, 2, 1, 211)
  for r, length in enumerate([3, 1]):
    ref = full[:, r, 10 + length - 1]
    assert np.abs(np.asarray(last[:, r, 0]) - ref).max() <= LOGIT_TOL
  # exact_head1=False: one unembedding matmul for all heads, the same
  # logits up to rounding.
  cache = init_cache(config, 2, 40, all_heads=True)
  _, cache = forward_cached(config, params, cache, jnp.asarray(seq[:, :10]),
                            all_heads=True)
  one, _ = forward_cached(config, params, cache, jnp.asarray(seq[:, 10:13]),
                          lengths, all_heads=True, last_only=True,
                          exact_head1=False)
  assert one.shape == last.shape
  assert np.abs(np.asarray(one) - np.asarray(last)).max() <= LOGIT_TOL


def test_exact_head1_false_in_generate(t3):
  config, params = t3
  prompt = np.arange(1, 9, dtype=np.int32)[None]
  kw = dict(max_new_tokens=9, mode="dynamo", eps_b=0.0, seed=3)
  out = dynamo_jax.generate(config, params, prompt, exact_head1=False, **kw)
  assert out.forward_passes == 3 and out.tokens.shape == (1, 9)
  with pytest.raises(InputError, match="exact_head1=False"):
    dynamo_jax.generate(config, params, prompt, max_new_tokens=4,
                        mode="verified", exact_head1=False)


def test_decode_step_exports_for_tpu_and_cuda(t3):
  config, params = t3
  b, n = 2, config.num_token_heads
  cache = init_cache(config, b, 32, all_heads=True)

  def step(params, cache, tokens, lengths, keys, history, history_len):
    return decode_step(config, params, cache, tokens, lengths, keys, history,
                       history_len, None, settings=SamplerSettings(k=8))

  args = (params, cache, jnp.zeros((b, n), jnp.int32),
          jnp.full((b,), n, jnp.int32), jnp.zeros((b, 2), jnp.uint32),
          jnp.zeros((b, 16), jnp.int32), jnp.zeros((b,), jnp.int32))
  for platform in ("tpu", "cuda"):
    exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    assert exported.platforms == (platform,)


def test_decoding_errors(t3):
  config, params = t3
  base = dynamo_jax.tiny_config()
  base_params = dynamo_jax.init_params(base)
  ok = np.ones((1, 4), np.int32)
  cases = [
      (dict(input_ids=np.zeros((1, 0), np.int32)), "empty"),
      (dict(input_ids=np.ones((1, 127), np.int32)), "exceeds max_position"),
      (dict(eps_b=1.5, mode="dynamo"), "eps_b must lie in"),
      (dict(eps_b=-0.1, mode="dynamo"), "eps_b must lie in"),
      (dict(temperature=0.0), "temperature must be > 0"),
      (dict(k=212, mode="dynamo"), "k must be an integer in 1..211"),
      (dict(seed=[1, 2]), "one int per row"),
  ]
  for kw, match in cases:
    args = dict(input_ids=ok, max_new_tokens=4)
    args.update(kw)
    with pytest.raises(InputError, match=match):
      dynamo_jax.generate(config, params, **args)
  for mode in ("dynamo", "verified"):
    with pytest.raises(InputError, match="needs a DynaMo model with token heads"):
      dynamo_jax.generate(base, base_params, ok, max_new_tokens=4, mode=mode)


def test_readme_decode_step_loop(t3, rng):
  """The README's own-jitted-loop example, run: it must equal generate()."""
  import functools
  from dynamo_jax import SamplerSettings, decode_step, init_cache
  from dynamo_jax.decoding.ar import pass_keys
  from dynamo_jax.decoding.dynamo import write_rows
  config, params = t3
  prompt = jnp.asarray(rng.randint(0, 211, size=(2, 5)), jnp.int32)
  B, P, n = prompt.shape[0], prompt.shape[1], config.num_token_heads
  cache = init_cache(config, B, max_len=P + 24 + n, all_heads=True)
  step = jax.jit(functools.partial(decode_step, config, eps_b=0.05,
                                   settings=SamplerSettings(k=50)),
                 donate_argnums=1)
  row_keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray([4, 9]))
  history, count = jnp.zeros((B, 24 + n), jnp.int32), jnp.zeros((B,), jnp.int32)
  res, cache = step(params, cache, prompt, jnp.full((B,), P), pass_keys(row_keys, 0),
                    history, count)
  for p in range(1, 8):
    history = write_rows(history, res.tokens_BxN, count)
    count = count + res.m_B
    res, cache = step(params, cache, res.tokens_BxN, res.m_B,
                      pass_keys(row_keys, p), history, count)
  history = write_rows(history, res.tokens_BxN, count)
  count = count + res.m_B
  ref = dynamo_jax.generate(config, params, prompt, max_new_tokens=int(count.min()),
                            mode="dynamo", eps_b=0.05, seed=[4, 9])
  for r in range(B):
    np.testing.assert_array_equal(np.asarray(history[r, :ref.tokens.shape[1]]),
                                  ref.tokens[r])


def test_dynamo_with_a_cooc_table(t3, rng):
  """A real table (counted from a token stream) weights and masks the grid."""
  from dynamo_jax.cooc import count_ngrams
  from dynamo_jax.errors import CheckpointError
  config, params = t3
  docs = [rng.randint(0, 40, size=500) for _ in range(20)]  # ids < 40 only
  table = count_ngrams(docs, vocab_size=211, max_order=3)
  prompt = rng.randint(0, 40, size=(2, 5))
  out = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                            mode="dynamo", eps_b=0.0, cooc=table, seed=[1, 2])
  plain = dynamo_jax.generate(config, params, prompt, max_new_tokens=24,
                              mode="dynamo", eps_b=0.0, seed=[1, 2])
  assert (plain.accepted == 3).all()
  # Every multi-token tuple emitted must be an n-gram of the table (absent
  # n-grams get weight 0), which the unweighted run does not respect.
  grams = {m: {tuple(d[i:i + m]) for d in docs for i in range(len(d) - m + 1)}
           for m in (2, 3)}
  def tuples(result):
    for r in range(2):
      pos = 0
      for m in result.accepted[r]:
        chunk = tuple(result.tokens[r, pos:pos + m])
        if m >= 2 and len(chunk) == m:
          yield chunk
        pos += m
  emitted = list(tuples(out))
  assert emitted and all(t in grams[len(t)] for t in emitted)
  assert not all(t in grams[len(t)] for t in tuples(plain))
  small = count_ngrams(docs, vocab_size=211, max_order=2)
  with pytest.raises(CheckpointError, match="order"):
    dynamo_jax.generate(config, params, prompt, max_new_tokens=4,
                        mode="dynamo", cooc=small)
  bigger = count_ngrams(docs, vocab_size=300, max_order=3)
  with pytest.raises(CheckpointError, match="vocab"):
    dynamo_jax.generate(config, params, prompt, max_new_tokens=4,
                        mode="dynamo", cooc=bigger)
