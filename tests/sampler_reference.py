"""Brute-force numpy DynaMo sampler, the reference for dynamo_sampler and
for kernels.threshold_and_draw.

Written independently of the jnp version: Python loops over rows and orders,
every grid built entry by entry with itertools.product, the blur as a full
3^m stencil (not separable), Otsu by its textbook definition (class weights
and means for every split), the draw as a flat float64 cumsum. Same
decisions as dynamo_jax/decoding/dynamo_sampler.py and dynamo_jax/ops/grid.py;
the random inputs come in as numbers (`u_B` for tuples, `ar_token_B` for
order 1), so both sides make the same draw.
"""

from __future__ import annotations

import itertools

import numpy as np

BINS = 256
TAPS = (0.25, 0.5, 0.25)


def _topk(logits_V, k, temperature):
  ids = np.argsort(-logits_V, kind="stable")[:k]  # lower id first on ties
  z = logits_V[ids].astype(np.float64) / temperature
  p = np.exp(z - z.max())
  return ids, p / p.sum()


def _weight(tables, tokens, alpha):
  joint = tables[len(tokens)][tokens]
  if joint == 0:
    return 0.0
  indep = np.prod([tables[1][t] for t in tokens])
  return (joint / indep) ** alpha


def _reflect101(i, size):
  if size == 1:
    return 0
  if i < 0:
    return -i
  if i >= size:
    return 2 * size - 2 - i
  return i


def _blur(grid):
  """Full 3^m stencil: every cell sums its 3^m neighbours (reflect-101) times
  the product of their 1-D taps."""
  out = np.zeros_like(grid)
  k = grid.shape[0]
  stencil = [(off, np.prod([TAPS[o + 1] for o in off]))
             for off in itertools.product((-1, 0, 1), repeat=grid.ndim)]
  for cell in itertools.product(range(k), repeat=grid.ndim):
    acc = 0.0
    for off, weight in stencil:
      acc += weight * grid[tuple(_reflect101(c + o, k)
                                 for c, o in zip(cell, off))]
    out[cell] = acc
  return out


def _otsu_keep(score):
  """Bool mask of entries whose bin is at or above Otsu's split."""
  values = score.ravel()
  lo, hi = values.min(), values.max()
  if hi == lo:
    return np.ones(score.shape, bool)
  bins = np.clip(np.floor((values - lo) / (hi - lo) * BINS), 0, BINS - 1)
  bins = bins.astype(int)
  counts = np.array([np.sum(bins == i) for i in range(BINS)], np.float64)
  centers = np.arange(BINS) + 0.5
  total = counts.sum()
  best, best_split = -1.0, None
  for split in range(1, BINS):
    n0, n1 = counts[:split].sum(), counts[split:].sum()
    if n0 == 0 or n1 == 0:
      continue
    w0, w1 = n0 / total, n1 / total
    mu0 = (counts[:split] * centers[:split]).sum() / n0
    mu1 = (counts[split:] * centers[split:]).sum() / n1
    between = w0 * w1 * (mu0 - mu1) ** 2
    if between > best:
      best, best_split = between, split
  if best_split is None:
    return np.ones(score.shape, bool)
  return (bins >= best_split).reshape(score.shape)


def _order_grid(probs, weight, repeats, m, k, *, eps_b, blur, otsu,
                repetition_penalty):
  """Final (thresholded, penalised, unnormalised) grid of order m, [k]*m.

  probs: per head 1..m, its [k] top-k marginal. weight(cell): the cell's
  co-occurrence weight, or weight None for none. repeats(cell): how many of
  the cell's positions hold a token of the history.
  """
  joint = np.zeros((k,) * m)
  for cell in itertools.product(range(k), repeat=m):
    p = 1.0
    for i, c in enumerate(cell):
      p *= probs[i][c]
    if weight is not None:
      p *= weight(cell)
    joint[cell] = p
  if joint.sum() > 0:
    joint /= joint.sum()
  keep = np.ones(joint.shape, bool)
  if otsu:
    keep = _otsu_keep(_blur(joint) if blur else joint)
  joint = np.where(keep & (joint >= eps_b), joint, 0.0)
  for cell in itertools.product(range(k), repeat=m):
    joint[cell] /= repetition_penalty ** repeats(cell)
  return joint


def _draw(grid, u, greedy):
  flat = grid.ravel()
  if greedy:
    idx = int(np.argmax(flat))
  else:
    csum = np.cumsum(flat)
    hits = np.nonzero((csum > u * csum[-1]) & (flat > 0))[0]
    idx = int(hits[0]) if len(hits) else int(np.nonzero(flat > 0)[0][-1])
  return np.unravel_index(idx, grid.shape), flat[idx] / flat.sum()


def reference_sample(logits_BxNxV, history_BxHs, history_len_B, tables, *,
                     n, k, temperature, eps_b, alpha=1.0, use_cooc=True,
                     blur=True, otsu=True, repetition_penalty=1.1,
                     greedy=False, u_B, ar_token_B):
  """(m [B], tokens [B, n], joint_prob [B]) by brute force.

  tables: None or {1: p [V], 2: P [V, V], 3: P [V, V, V], ...} of n-gram
  probabilities. temperature: scalar or per head.
  """
  logits_BxNxV = np.asarray(logits_BxNxV, np.float64)
  b, heads_n, _ = logits_BxNxV.shape
  temps = np.broadcast_to(np.asarray(temperature, np.float64), (heads_n,))
  use_tables = tables if use_cooc else None
  ms, tokens, probs = [], np.zeros((b, n), np.int64), []
  for row in range(b):
    seen = set(int(t) for t in history_BxHs[row][:history_len_B[row]])
    heads = [_topk(logits_BxNxV[row, i], k, temps[i]) for i in range(n)]
    tokens_of = lambda cell, h=heads: tuple(int(h[i][0][c])
                                            for i, c in enumerate(cell))
    weight = None
    if use_tables is not None:
      weight = lambda cell, t=tokens_of: _weight(use_tables, t(cell), alpha)
    repeats = lambda cell, t=tokens_of, s=seen: sum(x in s for x in t(cell))
    for m in range(n, 1, -1):
      grid = _order_grid([h[1] for h in heads], weight, repeats, m, k,
                         eps_b=eps_b, blur=blur, otsu=otsu,
                         repetition_penalty=repetition_penalty)
      if np.any(grid > eps_b ** (m - 1)):
        cell, prob = _draw(grid, u_B[row], greedy)
        tokens[row, :m] = [heads[i][0][c] for i, c in enumerate(cell)]
        break
    else:
      m = 1
      z = logits_BxNxV[row, 0] / temps[0]
      logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
      tokens[row, 0] = ar_token_B[row]
      prob = np.exp(logp[ar_token_B[row]])
    ms.append(m)
    probs.append(prob)
  return np.array(ms), tokens, np.array(probs)


def reference_orders(ids_BxNxK, probs_BxNxK, seen_BxNxK, weights, eps_b,
                     repetition_penalty, u_B, *, blur=True, otsu=True,
                     greedy=False):
  """Orders 2..N from given top-k marginals, as kernels.threshold_and_draw
  returns them: (m [B], 1 where no order passes; tokens [B, N] and
  joint_prob [B], 0 where m = 1; passed [B, N], col 0 True; peak [B, N],
  col 0 zero).

  seen_BxNxK: the id is in the row's history. weights: per order 2..N,
  None or a dense [B, K, ..., K] grid of co-occurrence weights.
  """
  ids, probs, seen = (np.asarray(x) for x in (ids_BxNxK, probs_BxNxK,
                                               seen_BxNxK))
  b, n, k = ids.shape
  ms, tokens = np.ones(b, np.int64), np.zeros((b, n), np.int64)
  joint_prob, peak = np.zeros(b), np.zeros((b, n))
  passed = np.zeros((b, n), bool)
  passed[:, 0] = True
  for row in range(b):
    repeats = lambda cell, r=row: sum(bool(seen[r, i, c])
                                      for i, c in enumerate(cell))
    for m, w in zip(range(2, n + 1), weights):
      weight = None
      if w is not None:
        w_row = np.asarray(w[row], np.float64)
        weight = lambda cell, w_row=w_row: w_row[cell]
      grid = _order_grid(probs[row, :m].astype(np.float64), weight, repeats,
                         m, k, eps_b=float(eps_b), blur=blur, otsu=otsu,
                         repetition_penalty=float(repetition_penalty))
      peak[row, m - 1] = grid.max()
      passed[row, m - 1] = grid.max() > float(eps_b) ** (m - 1)
      if passed[row, m - 1]:  # the largest passing order wins
        cell, joint_prob[row] = _draw(grid, u_B[row], greedy)
        ms[row] = m
        tokens[row, :m] = [ids[row, i, c] for i, c in enumerate(cell)]
  return ms, tokens, joint_prob, passed, peak
