"""Tree-verified (lossless) decoding, beyond the paper.

The chain of verified.py checks one draft per position. Here the heads
propose a tree: the Tc most probable continuations (d_1 .. d_Nd) of the
co-occurrence-weighted joint grid that DynaMo builds from heads 2..n, and
one pass verifies all of them with head 1, each fed token attending to the
past and its own ancestors only (`forward_cached(tree_TxT=...)`).

  pass: feed the tree [x; path_1; ...; path_Tc] (x decided by head 1 last
        pass, each path Nd tokens laid out one after the other). Walking
        down from x: at depth i head 1's distribution at the current node
        gives t_i (greedy: argmax; sampling: one draw); if some still-live
        path has t_i at depth i, the walk moves to it (the first such path),
        else it stops. With j steps taken the pass emits t_1 .. t_j and the
        token t_{j+1} drawn at the last node reached (j + 1 tokens); the
        cache keeps x and that path's first j tokens, moved to the slots
        right after the past; heads 2..n at the last node propose the next
        tree.

Every emitted token is head 1's own choice in its exact context, so greedy
output equals plain AR greedy token for token, and sampled output has AR's
distribution exactly: t_i is drawn from p(. | past) whatever the candidates
are, which were fixed before the draw; a candidate only saves the pass that
would have computed the next distribution. (This is the multi-candidate rule
for candidates chosen deterministically, as top-Tc paths are: the chance of
a step is p's mass on the live children.)

Sampling: path 0 is instead the chain's draft, d_i drawn from q_i (head
i + 1 at temperature T), and the walk treats it as the chain does. While
the walk is on path 0, d_i is accepted with probability min(1, p(d_i) /
q_i(d_i)); on rejection t_i is drawn from the residual max(0, p - q_i)
(renormalised), which never holds d_i, and the walk moves to a
deterministic path that has t_i, if one is live. Either way t_i ~ p, as in
speculative sampling; once off path 0 every t_i is a plain draw from p. So
the tree accepts at least what the chain accepts, plus the residual draws
that land on a deterministic path. Greedy has no sampled path (without a
table the chain's argmax drafts are the grid's best path anyway).

Candidates: each head 2..n's top-k_tree ids and their softmax over those k
(temperature 1, ranking only), the product grid over Nd heads, times the
co-occurrence weight w(x, d_1 .. d_Nd) of the whole (n)-gram when a table is
given; a row whose weights are all 0 (no (n)-gram of the grid seen in the
table) ranks by the product alone. The Tc best grid entries are the paths.

Shape letters (beyond dynamo_jax.model.config): Nd = n - 1 tokens per path,
Tc candidate paths, Tn = 1 + Tc * Nd tree nodes fed per pass, Kt = k_tree.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.decoding.ar import not_done, pass_keys
from dynamo_jax.decoding.sampling import draw_from_probs
from dynamo_jax.decoding.verified import (emit_accepted, propose_drafts,
                                         residual)
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import (KVCache, Params, forward_cached,
                                     init_cache, unembed)


def tree_topology(paths: int, depth: int) -> np.ndarray:
  """bool [Tn, Tn]: node (c, i) (index 1 + c * depth + i) has the root and
  (c, 0..i) as ancestors-or-self; the root only itself."""
  tn = 1 + paths * depth
  anc = np.zeros((tn, tn), bool)
  anc[:, 0] = True
  for c in range(paths):
    for i in range(depth):
      row = 1 + c * depth + i
      anc[row, 1 + c * depth: row + 1] = True
  return anc


def propose_paths(x_B, logits_BxNdxV, cooc, *, paths: int, k_tree: int,
                  alpha: float = 1.0):
  """int32 [B, Tc, Nd]: the Tc best continuations after x (see the module
  docstring), best first."""
  b, nd, _ = logits_BxNdxV.shape
  top_BxNdxKt, ids_BxNdxKt = jax.lax.top_k(
      logits_BxNdxV.astype(jnp.float32), k_tree)
  logp_BxNdxKt = jax.nn.log_softmax(top_BxNdxKt, axis=-1)
  # Sum of the heads' log-probabilities over the Kt^Nd grid, C order.
  score_BxE = jnp.zeros((b, 1), jnp.float32)
  for i in range(nd):
    score_BxE = (score_BxE[:, :, None] + logp_BxNdxKt[:, i, None, :]).reshape(
        b, -1)
  if cooc is not None:
    ids_BxMxKt = jnp.concatenate(
        [jnp.broadcast_to(x_B[:, None, None], (b, 1, k_tree)), ids_BxNdxKt],
        axis=1).astype(jnp.int32)
    # Entry (0, i_1..i_Nd) of the order-n grid: x with each path.
    w_BxE = cooc.grid_weights(ids_BxMxKt, alpha)[:, 0].reshape(b, -1)
    w_BxE = w_BxE.astype(jnp.float32)
    seen_B = jnp.any(w_BxE > 0, axis=1)
    weighted_BxE = jnp.where(w_BxE > 0, score_BxE + jnp.log(
        jnp.maximum(w_BxE, 1e-30)), -jnp.inf)
    score_BxE = jnp.where(seen_B[:, None], weighted_BxE, score_BxE)
  _, flat_BxTc = jax.lax.top_k(score_BxE, paths)
  # Flat grid index -> per-depth top-k index (C order: depth 0 slowest).
  digits = []
  rest_BxTc = flat_BxTc
  for _ in range(nd):
    digits.append(rest_BxTc % k_tree)
    rest_BxTc = rest_BxTc // k_tree
  idx_BxTcxNd = jnp.stack(digits[::-1], axis=-1)
  return jnp.take_along_axis(ids_BxNdxKt[:, None], idx_BxTcxNd[..., None],
                             axis=-1)[..., 0].astype(jnp.int32).reshape(
                                 b, paths, nd)


def _probs(logits_BxV, temperature):
  return jax.nn.softmax(logits_BxV.astype(jnp.float32) / temperature, axis=-1)


def _choose(keys_B, logits_BxV, temperature, greedy: bool):
  """Head 1's token: argmax (first on ties, as AR's) or one draw per row."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return draw_from_probs(keys_B, _probs(logits_BxV, temperature))


def _sub(keys_B, i):
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)


def propose(x_B, logits_BxNdxV, keys_B, temperature, cooc, *, greedy: bool,
            paths: int, k_tree: int, alpha: float = 1.0):
  """The next tree after root x: (paths int32 [B, Tc, Nd], q float32 [B, Nd,
  V] or [B, Nd, 0] when greedy). Sampling: path 0 is the chain's draft,
  d_i drawn from q_i = softmax(head i + 1 / T) with key 100 + i, and paths
  1.. are the Tc - 1 best of the grid; greedy: the Tc best."""
  b, nd, _ = logits_BxNdxV.shape
  if greedy:
    return (propose_paths(x_B, logits_BxNdxV, cooc, paths=paths,
                          k_tree=k_tree, alpha=alpha),
            jnp.zeros((b, nd, 0), jnp.float32))
  d_BxNd, q_BxNdxV = propose_drafts(logits_BxNdxV.astype(jnp.float32),
                                    keys_B, temperature, greedy=False)
  paths_BxTcxNd = d_BxNd[:, None]
  if paths > 1:
    paths_BxTcxNd = jnp.concatenate(
        [paths_BxTcxNd, propose_paths(x_B, logits_BxNdxV, cooc,
                                      paths=paths - 1, k_tree=k_tree,
                                      alpha=alpha)], axis=1)
  return paths_BxTcxNd, q_BxNdxV


def walk(head1_at, paths_BxTcxNd, keys_B, temperature, greedy: bool,
         q_BxNdxV=None):
  """Verifies the tree: (steps j [B], path c [B], last node [B], next token
  [B]); the emitted tokens are paths[c, :j] and then the next token.
  head1_at(node_B) gives head 1's logits [B, V] at one node per row (the
  walk needs them at Nd + 1 nodes, not at all Tn). q_BxNdxV (sampling
  only): path 0 was drawn from it, and is verified with the speculative
  rule (module docstring)."""
  b, tc, nd = paths_BxTcxNd.shape
  rows = jnp.arange(b)
  sampled = q_BxNdxV is not None and not greedy
  node_B = jnp.zeros((b,), jnp.int32)
  live_BxTc = jnp.ones((b, tc), bool)
  alive_B = jnp.ones((b,), bool)
  j_B = jnp.zeros((b,), jnp.int32)
  path_B = jnp.zeros((b,), jnp.int32)
  next_B = jnp.zeros((b,), jnp.int32)
  for i in range(nd + 1):
    logits_BxV = head1_at(node_B)
    if greedy:  # as _choose
      t_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    else:
      p_BxV = _probs(logits_BxV, temperature)
      t_B = draw_from_probs(_sub(keys_B, 10 + i), p_BxV)
    if sampled and i < nd:
      # Still on the sampled path 0: its draft, or a residual draw.
      d_B = paths_BxTcxNd[:, 0, i]
      u_B = jax.vmap(lambda k: jax.random.uniform(k, ()))(
          _sub(keys_B, 20 + i))
      ok_B = u_B * q_BxNdxV[rows, i, d_B] < p_BxV[rows, d_B]  # u < p/q
      other_B = draw_from_probs(_sub(keys_B, 30 + i),
                                residual(p_BxV, q_BxNdxV[:, i]))
      t_B = jnp.where(live_BxTc[:, 0], jnp.where(ok_B, d_B, other_B), t_B)
    if i == nd:
      next_B = jnp.where(alive_B, t_B, next_B)
      break
    match_BxTc = live_BxTc & (paths_BxTcxNd[:, :, i] == t_B[:, None])
    step_B = alive_B & jnp.any(match_BxTc, axis=1)
    # A row that stops here emits t as its next token.
    next_B = jnp.where(alive_B & ~step_B, t_B, next_B)
    first_B = jnp.argmax(match_BxTc, axis=1).astype(jnp.int32)
    path_B = jnp.where(step_B, first_B, path_B)
    node_B = jnp.where(step_B, 1 + first_B * nd + i, node_B)
    live_BxTc = jnp.where(step_B[:, None], match_BxTc, live_BxTc)
    j_B = j_B + step_B.astype(jnp.int32)
    alive_B = step_B
  return j_B, path_B, node_B, next_B


def keep_path(cache: KVCache, end_B, path_B, nd: int) -> KVCache:
  """Moves each row's chosen path (slots end+1+c*Nd ..) to end+1 .. in
  every layer's cache; `end` is left for the caller to set."""
  start_B = end_B + 1 + path_B * nd

  def move(c_HxSxDh, src, dst):
    chunk = jax.lax.dynamic_slice_in_dim(c_HxSxDh, src, nd, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(c_HxSxDh, chunk, dst, axis=1)

  b = end_B.shape[0]
  out = {}
  for name, entry in cache.items():
    if name == "end":
      out[name] = entry
      continue
    # [BH, S, Dh] as [B, H, S, Dh] (dynamo_jax.model.layers.Cache).
    out[name] = {kv: jax.vmap(move)(arr.reshape(b, -1, *arr.shape[1:]),
                                    start_B, end_B + 1).reshape(arr.shape)
                 for kv, arr in entry.items()}
  return out


class TreeState(NamedTuple):
  """The tree loop's carry; out_BxG, count_B, passes as in VerifiedState."""
  cache: KVCache
  out_BxG: jax.Array         # int32 [B, max_new_tokens + n]
  count_B: jax.Array         # int32 [B]
  x_B: jax.Array             # int32 [B], head 1's token, the tree's root
  paths_BxTcxNd: jax.Array   # int32 [B, Tc, Nd], the candidates after it
  q_BxNdxV: jax.Array        # float32 [B, Nd, V] path 0's law ([B, Nd, 0]
                             # when greedy)
  accepted_BxNp: jax.Array   # int32 [B, max_new_tokens]
  passes: jax.Array          # int32 []


def tree_nodes(config: PythiaConfig, paths: int) -> int:
  """Tn, the tokens fed per pass."""
  return 1 + paths * (config.num_token_heads - 1)


def tree_init(config: PythiaConfig, params: Params, prompt_BxP, row_keys_Bx2,
              temperature, cooc, *, max_new_tokens: int, greedy: bool,
              paths: int, k_tree: int, alpha: float = 1.0) -> TreeState:
  """Prefill: feeds the prompt, emits head 1's token, proposes the tree."""
  b, p = prompt_BxP.shape
  n = config.num_token_heads
  cache = init_cache(config, b, p + max_new_tokens + tree_nodes(config, paths),
                     all_heads=True)
  logits_NxBx1xV, cache = forward_cached(config, params, cache, prompt_BxP,
                                         all_heads=True, last_only=True)
  keys_B = pass_keys(row_keys_Bx2, 0)
  x_B = _choose(_sub(keys_B, 10), logits_NxBx1xV[0, :, 0], temperature,
                greedy)
  paths_BxTcxNd, q_BxNdxV = propose(
      x_B, jnp.swapaxes(logits_NxBx1xV[1:, :, 0], 0, 1), keys_B, temperature,
      cooc, greedy=greedy, paths=paths, k_tree=k_tree, alpha=alpha)
  out_BxG = jnp.zeros((b, max_new_tokens + n), jnp.int32).at[:, 0].set(x_B)
  accepted_BxNp = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(1)
  return TreeState(cache, out_BxG, jnp.ones((b,), jnp.int32), x_B,
                   paths_BxTcxNd, q_BxNdxV, accepted_BxNp, jnp.int32(1))


def tree_body(config: PythiaConfig, params: Params, state: TreeState,
              row_keys_Bx2, temperature, cooc, *, max_new_tokens: int,
              greedy: bool, paths: int, k_tree: int,
              alpha: float = 1.0) -> TreeState:
  """One pass: feeds the tree, walks it, keeps the path, proposes anew."""
  nd = config.num_token_heads - 1
  b = state.x_B.shape[0]
  keys_B = pass_keys(row_keys_Bx2, state.passes)
  active_B = state.count_B < max_new_tokens
  end_B = state.cache["end"]
  chunk_BxTn = jnp.concatenate(
      [state.x_B[:, None], state.paths_BxTcxNd.reshape(b, -1)], axis=1)
  tree_TnxTn = tree_topology(paths, nd)
  hidden_NxBxTnxD, cache = forward_cached(config, params, state.cache,
                                          chunk_BxTn, all_heads=True,
                                          tree_TxT=tree_TnxTn,
                                          hidden_only=True)
  rows = jnp.arange(b)
  j_B, path_B, node_B, next_B = walk(
      lambda node_B: unembed(config, params, hidden_NxBxTnxD[0, rows, node_B]),
      state.paths_BxTcxNd, keys_B, temperature, greedy, state.q_BxNdxV)
  cache = keep_path(cache, end_B, path_B, nd)
  cache["end"] = end_B + jnp.where(active_B, j_B + 1, 0)
  at_node_BxNdxV = jnp.swapaxes(
      unembed(config, params, hidden_NxBxTnxD[1:, rows, node_B]), 0, 1)
  new_paths, new_q = propose(next_B, at_node_BxNdxV, keys_B, temperature,
                             cooc, greedy=greedy, paths=paths, k_tree=k_tree,
                             alpha=alpha)
  out_BxG, count_B, accepted_BxNp = emit_accepted(
      state.out_BxG, state.count_B, state.accepted_BxNp, state.passes,
      state.paths_BxTcxNd[rows, path_B], j_B, next_B, active_B)
  return TreeState(cache, out_BxG, count_B, next_B, new_paths, new_q,
                   accepted_BxNp, state.passes + 1)


@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "greedy", "paths", "k_tree", "alpha"))
def generate_tree(config: PythiaConfig, params: Params, prompt_BxP,
                  row_keys_Bx2, temperature, cooc, *, max_new_tokens: int,
                  greedy: bool, paths: int, k_tree: int, alpha: float = 1.0):
  """Same outputs as `generate_dynamo`: (tokens, accepted, passes)."""
  kw = dict(max_new_tokens=max_new_tokens, greedy=greedy, paths=paths,
            k_tree=k_tree, alpha=alpha)
  state = tree_init(config, params, prompt_BxP, row_keys_Bx2, temperature,
                    cooc, **kw)
  state = jax.lax.while_loop(
      functools.partial(not_done, max_new_tokens=max_new_tokens),
      lambda s: tree_body(config, params, s, row_keys_Bx2, temperature, cooc,
                          **kw), state)
  return (state.out_BxG[:, :max_new_tokens], state.accepted_BxNp,
          state.passes)
