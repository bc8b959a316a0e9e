"""Tree verification: tree feeding against the uncached forward, the kept
path against feeding it as a sequence, greedy against AR, and sampling
against AR's exact distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.decoding import tree as tree_lib
from dynamo_jax.errors import InputError
from dynamo_jax.model import forward_cached, init_cache, tiny_config
from tests.conftest import random_params

LOGIT_TOL = 1e-4  # cached vs uncached, as tests/test_decoding.py


def test_topology_by_hand():
  anc = tree_lib.tree_topology(2, 2)
  # root, (0,0), (0,1), (1,0), (1,1)
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0],
                   [1, 0, 0, 1, 0],
                   [1, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(anc, want)


def test_tree_feeding_equals_uncached_forward(t3, rng):
  """Every node's logits (all heads) equal the uncached forward over the
  prompt plus the node's root-to-node path, with rows at different ends."""
  config, params = t3
  b, paths, nd = 2, 3, 2
  prompts = [rng.randint(0, 211, size=5), rng.randint(0, 211, size=9)]
  cache = init_cache(config, b, 32, all_heads=True)
  chunk = np.zeros((b, 9), np.int32)
  for r, p in enumerate(prompts):
    chunk[r, :len(p)] = p
  _, cache = forward_cached(config, params, cache, chunk,
                            np.array([5, 9], np.int32), all_heads=True)
  tree = rng.randint(0, 211, size=(b, 1 + paths * nd)).astype(np.int32)
  tree[:, 3:5] = tree[:, 1:3]  # a repeated path is fed twice, harmlessly
  logits, new_cache = forward_cached(
      config, params, cache, tree, all_heads=True,
      tree_TxT=tree_lib.tree_topology(paths, nd))
  assert np.array_equal(np.asarray(new_cache["end"]), [5 + 7, 9 + 7])
  anc = tree_lib.tree_topology(paths, nd)
  for r in range(b):
    for node in range(tree.shape[1]):
      seq = np.concatenate([prompts[r], tree[r][anc[node]]])[None]
      want = dynamo_jax.forward(config, params, seq, all_heads=True)
      np.testing.assert_allclose(logits[:, r, node], want[:, 0, -1],
                                 atol=LOGIT_TOL, rtol=0)


def test_kept_path_equals_feeding_it_as_a_sequence(t3, rng):
  """After keep_path, decoding on from the cache gives the logits of the
  uncached forward over prompt + root + the kept path's j tokens."""
  config, params = t3
  paths, nd = 3, 2
  prompt = rng.randint(0, 211, size=(2, 6)).astype(np.int32)
  tree = rng.randint(0, 211, size=(2, 1 + paths * nd)).astype(np.int32)
  cache = init_cache(config, 2, 40, all_heads=True)
  _, cache = forward_cached(config, params, cache, prompt, all_heads=True)
  end = cache["end"]
  _, cache = forward_cached(config, params, cache, tree, all_heads=True,
                            tree_TxT=tree_lib.tree_topology(paths, nd))
  path = np.array([2, 1], np.int32)
  j = np.array([2, 1], np.int32)
  cache = tree_lib.keep_path(cache, end, path, nd)
  cache["end"] = end + 1 + j
  nxt = rng.randint(0, 211, size=(2, 1)).astype(np.int32)
  logits, _ = forward_cached(config, params, cache, nxt, all_heads=True)
  for r in range(2):
    kept = tree[r, 1 + path[r] * nd: 1 + path[r] * nd + j[r]]
    seq = np.concatenate([prompt[r], tree[r, :1], kept, nxt[r]])[None]
    want = dynamo_jax.forward(config, params, seq, all_heads=True)
    np.testing.assert_allclose(logits[:, r, 0], want[:, 0, -1],
                               atol=LOGIT_TOL, rtol=0)


def test_tree_greedy_equals_ar_greedy(trained_t3, t3, rng):
  for config, params in (trained_t3, t3):
    for length, new, paths in ((1, 40, 1), (5, 33, 4), (17, 50, 9)):
      prompt = rng.randint(0, config.vocab_size - 1, size=(4, length))
      ar = dynamo_jax.generate(config, params, prompt, max_new_tokens=new,
                               greedy=True)
      out = dynamo_jax.generate(config, params, prompt, max_new_tokens=new,
                                mode="verified", greedy=True, tree=paths,
                                k_tree=3)
      np.testing.assert_array_equal(out.tokens, ar.tokens)
  # Trained heads: rows accept their own lengths, and a tree accepts more
  # per pass than the chain on the same prompts.
  config, params = trained_t3
  prompt = (np.arange(8)[None] * np.array([[1], [2], [3]])) % 31
  chain = dynamo_jax.generate(config, params, prompt, max_new_tokens=60,
                              mode="verified", greedy=True)
  out = dynamo_jax.generate(config, params, prompt, max_new_tokens=60,
                            mode="verified", greedy=True, tree=4, k_tree=4)
  assert out.tokens_per_pass >= chain.tokens_per_pass > 2.0
  assert len(np.unique(out.accepted)) > 1


def test_tree_sampling_has_ar_distribution():
  """Chi-square test of 6000 tree-verified samples of (t1, t2, t3) against
  AR's exact distribution; AR's own samples pass the same test."""
  from scipy import stats
  v = 5
  config = tiny_config(vocab_size=v, hidden_size=16, num_heads=2,
                       intermediate_size=32, num_token_heads=3)
  params = random_params(config, seed=3, scale=0.5)
  prompt = np.array([[1, 4, 2]])
  temp = 0.7
  first = jax.nn.softmax(dynamo_jax.forward(config, params, prompt)[0, -1]
                         / temp)
  two = np.concatenate([np.repeat(prompt, v, 0), np.arange(v)[:, None]], 1)
  second = jax.nn.softmax(dynamo_jax.forward(config, params, two)[:, -1]
                          / temp, axis=-1)
  three = np.concatenate([np.repeat(two, v, 0), np.tile(np.arange(v), v)
                          [:, None]], 1)
  third = jax.nn.softmax(dynamo_jax.forward(config, params, three)[:, -1]
                         / temp, axis=-1)
  exact = (np.asarray(first, np.float64)[:, None, None]
           * np.asarray(second, np.float64)[:, :, None]
           * np.asarray(third, np.float64).reshape(v, v, v)).ravel()
  exact /= exact.sum()
  n = 6000
  pvalues = {}
  for mode, kw in (("tree", dict(mode="verified", tree=3, k_tree=2)),
                   ("ar", dict(mode="ar"))):
    out = dynamo_jax.generate(config, params, np.repeat(prompt, n, 0),
                              max_new_tokens=3, seed=list(range(n)),
                              temperature=temp, **kw)
    if mode == "tree":
      # The walk both stopped early and went all the way down.
      firsts = out.accepted[:, 1]
      assert (firsts == 1).mean() > 0.05 and (firsts >= 2).mean() > 0.05
    cells = (out.tokens[:, 0] * v + out.tokens[:, 1]) * v + out.tokens[:, 2]
    observed = np.bincount(cells, minlength=v ** 3)
    keep = exact * n >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum())
    exp *= obs.sum() / exp.sum()
    pvalues[mode] = stats.chisquare(obs, exp).pvalue
  assert pvalues["ar"] > 1e-3 and pvalues["tree"] > 1e-3, pvalues


def test_batched_tree_rows_equal_each_row_alone(t3, rng):
  config, params = t3
  prompt = rng.randint(0, 211, size=(3, 5))
  kw = dict(max_new_tokens=20, mode="verified", tree=4, k_tree=3,
            temperature=0.8)
  batch = dynamo_jax.generate(config, params, prompt, seed=[3, 4, 5], **kw)
  for r in range(3):
    alone = dynamo_jax.generate(config, params, prompt[r:r + 1],
                                seed=[3 + r], **kw)
    np.testing.assert_array_equal(batch.tokens[r], alone.tokens[0])


@pytest.mark.parametrize("kw, match", [
    (dict(mode="dynamo", tree=4), "verified-mode option"),
    (dict(mode="verified", tree=-1), "integer >= 0"),
    (dict(mode="verified", tree=10, k_tree=3), "more paths than the grid"),
    (dict(mode="verified", tree=2, k_tree=0), "k_tree must be"),
    (dict(mode="verified", tree=2, k_tree=212), "k_tree must be an integer in 1..211"),
])
def test_tree_arguments_refused(t3, kw, match):
  config, params = t3
  with pytest.raises(InputError, match=match):
    dynamo_jax.generate(config, params, [[1, 2]], max_new_tokens=4, **kw)


def test_sampled_walk_keeps_p_and_uses_residual_matches():
  """The walk's sampled path 0 (speculative rule) with deterministic paths
  beside it, on hand-made laws over V = 4, Nd = 2: the first token follows
  p(. | root), the second p(. | first) among walks that stepped, the third
  p(. | first, second) among walks that took both steps (chi-square against
  numpy's laws, p-value > 1e-3, 20,000 walks), and rejected drafts do move
  onto deterministic paths (the branch the chain lacks)."""
  from scipy import stats
  v, nd, trials = 4, 2, 20000
  rng = np.random.default_rng(0)
  root_p = np.array([0.1, 0.5, 0.15, 0.25])
  next_p = rng.dirichlet(np.ones(v), size=v)  # p(. | first token)
  last_p = rng.dirichlet(np.ones(v), size=(v, v))  # p(. | first, second)
  q = np.stack([np.array([0.6, 0.1, 0.2, 0.1]),  # path 0's laws: far from p
                np.array([0.25, 0.25, 0.25, 0.25])])
  keys = jax.random.split(jax.random.PRNGKey(7), trials)
  drafts = np.stack([
      np.asarray(jax.vmap(lambda k: jax.random.choice(
          jax.random.fold_in(k, 500 + i), v, p=q[i]))(keys)) for i in range(nd)],
      axis=1)
  fixed = np.array([[1, 0], [3, 2]])  # deterministic paths 1 and 2
  paths = np.concatenate([drafts[:, None], np.broadcast_to(
      fixed, (trials, 2, nd))], axis=1).astype(np.int32)
  temperature = 0.7

  def head1_at(node_B):
    # Node (c, i) holds paths[c, :i+1]; the root holds nothing.
    depth_B = jnp.where(node_B == 0, -1, (node_B - 1) % nd)
    path_B = jnp.maximum(node_B - 1, 0) // nd
    rows = jnp.arange(trials)
    first_B = paths_j[rows, path_B, 0]
    second_B = paths_j[rows, path_B, jnp.minimum(depth_B, nd - 1)]
    probs = jnp.where((depth_B == -1)[:, None], root_p_j[None],
                      jnp.where((depth_B == 0)[:, None], next_p_j[first_B],
                                last_p_j[first_B, second_B]))
    return jnp.log(probs) * temperature  # softmax(logits / T) = probs

  paths_j = jnp.asarray(paths)
  root_p_j, next_p_j, last_p_j = (jnp.asarray(a, jnp.float32)
                                  for a in (root_p, next_p, last_p))
  j, path, _, nxt = jax.jit(lambda k: tree_lib.walk(
      head1_at, paths_j, k, temperature, False,
      jnp.asarray(q[None].repeat(trials, 0), jnp.float32)))(keys)
  j, path, nxt = (np.asarray(a) for a in (j, path, nxt))
  chosen = paths[np.arange(trials), path]
  first = np.where(j >= 1, chosen[:, 0], nxt)
  pvalue = stats.chisquare(np.bincount(first, minlength=v),
                           root_p * trials).pvalue
  assert pvalue > 1e-3, pvalue
  stepped = j >= 1
  second = np.where(j >= 2, chosen[:, 1], nxt)
  for t1 in range(v):
    sel = stepped & (first == t1)
    if sel.sum() < 200:
      continue
    pvalue = stats.chisquare(np.bincount(second[sel], minlength=v),
                             next_p[t1] * sel.sum()).pvalue
    assert pvalue > 1e-3, (t1, pvalue)
  # The last token, drawn at depth Nd after both steps were taken.
  full = j == nd
  for t1 in range(v):
    for t2 in range(v):
      sel = full & (first == t1) & (second == t2)
      if sel.sum() < 200:
        continue
      pvalue = stats.chisquare(np.bincount(nxt[sel], minlength=v),
                               last_p[t1, t2] * sel.sum()).pvalue
      assert pvalue > 1e-3, (t1, t2, pvalue)
  assert full.mean() > 0.05
  # Rejected drafts that continued on a deterministic path.
  rescued = stepped & (path >= 1) & (first != drafts[:, 0])
  assert rescued.mean() > 0.05, rescued.mean()
