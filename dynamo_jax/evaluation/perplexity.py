"""Multi-token perplexities of a DynaMo-Tn model on a token stream
(DYNAMO.md section 4).

Definitions. A stream is documents separated by the EOS id; each document is
scored as its tokens followed by its EOS (the EOS is a target, as in
training), and no context or target crosses a document boundary. A
"position" t is the last context token x_t; head n's prediction there is
p_n(x_{t+n} | x_{<=t}).

  PPL_n    = exp(mean over positions t with t+n in the document of
             -log p_n(x_{t+n} | x_{<=t}))
  PPL_1:n  = exp(mean over positions t with t+n in the document of
             -(1/n) sum_{i<=n} log p_i(x_{t+i} | x_{<=t}))

The joint of x_{t+1..t+n} is estimated as the product of heads 1..n's
marginals: that is the estimate Algorithm 1 starts from before its
co-occurrence weighting, and unlike the weighted grid it is normalised over
the whole vocabulary^n, so it is a proper probability. PPL_n and PPL_1:n at
a given n average over the same positions.

PPL_d, the dynamic case at a back-off threshold eps_b: the perplexity of
the tuples Algorithm 1 would emit while reading the document. At every
position t the sampler's back-off (`dynamo_sample` with eps_b, the
co-occurrence table when given, temperature, top-k, blur, Otsu, and the
repetition penalty over the document's tokens x_1..x_t in the window)
gives the order m_t in 1..n it would emit there; it does not depend on the
draw. Walking each document from its first position, t_0 = 0 and
t_{j+1} = t_j + m_{t_j} (m capped so that the tuple ends inside the
document), the tuple x_{t+1..t+m} is scored with the same joint estimate,
-sum_{i<=m} log p_i(x_{t+i} | x_{<=t}):

  PPL_d    = exp(sum over the walk of the tuple NLLs / tokens scored)

and tokens per pass = tokens scored / tuples. At eps_b = 1 every m is 1, so
PPL_d = PPL_1; at eps_b = 0 without a table every m is n, and PPL_d is
PPL_1:n over every n-th position.

Windows. A document longer than the window W is scored in windows starting
every `stride` tokens; a position is scored in the window that gives it the
longest context (the first window scores its first W positions, every later
one only its last `stride`), so each position counts once and has at least
W - stride tokens of context (stride = W: non-overlapping windows). Targets
may lie past a window's end: they are read from the document.

Shapes: N token heads, B windows per batch, W window, V vocabulary, X
scored positions of a stream (`nll_NxX`), C rows per sampler chunk; in a
multi-process run Pr processes, Nb batches scored by each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

from tqdm.auto import tqdm

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.cooc import lookup
from dynamo_jax.cooc.table import CoocTable
from dynamo_jax.decoding.dynamo_sampler import dynamo_sample
from dynamo_jax.errors import InputError
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, forward
from dynamo_jax.training.loss import token_nll


@dataclasses.dataclass(frozen=True)
class Window:
  """One window: tokens [start, start + W) of a document (padded), and the
  in-window positions [first, last) it scores."""
  doc: int
  start: int
  first: int
  last: int


def split_documents(stream: np.ndarray, eos_id: int) -> list[np.ndarray]:
  """Documents of an EOS-separated stream, each with its EOS; a trailing
  piece without EOS is kept as is; empty documents are dropped."""
  stream = np.asarray(stream).astype(np.int64)
  ends = np.flatnonzero(stream == eos_id) + 1
  docs = np.split(stream, ends)
  return [d for d in docs if d.size > 1 or (d.size == 1 and d[0] != eos_id)]


def make_windows(doc_lengths: list[int], window: int, stride: int) -> list[Window]:
  """The windows that score every position t < len - 1 of every document
  exactly once (positions whose next token exists)."""
  if not 1 <= stride <= window:
    raise InputError(f"stride must lie in 1..window ({window}), got {stride}.")
  out = []
  for d, length in enumerate(doc_lengths):
    scored = length - 1  # positions with at least one target
    start = 0
    while True:
      first = 0 if start == 0 else window - stride
      last = min(window, scored - start)
      if last > first:
        out.append(Window(d, start, first, last))
      if start + window >= scored:
        break
      start += stride
  return out


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(config: PythiaConfig, params: Params, tokens_BxW, targets_NxBxW):
  """-log p_n(target) for every head, position: float32 [N, B, W] (a target
  of -1, not scored, is read as token 0)."""
  logits_NxBxWxV = forward(config, params, tokens_BxW, all_heads=True)
  return token_nll(logits_NxBxWxV, jnp.maximum(targets_NxBxW, 0))


_SAMPLER_ROWS = 32  # C: positions per sampler call (a K^3 grid is 0.5 MB a row)


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _window_nll_orders(config: PythiaConfig, params: Params, tokens_BxW,
                       targets_NxBxW, cooc, eps_b, temperature,
                       repetition_penalty, *, k: int):
  """`_window_nll`'s NLLs and the order m [B, W] Algorithm 1 would emit at
  each position (history: the window's tokens up to the position)."""
  logits_NxBxWxV = forward(config, params, tokens_BxW, all_heads=True)
  nll = token_nll(logits_NxBxWxV, jnp.maximum(targets_NxBxW, 0))
  n, b, w, v = logits_NxBxWxV.shape
  rows = b * w
  pad = -rows % _SAMPLER_ROWS
  logits_RxNxV = jnp.pad(
      logits_NxBxWxV.transpose(1, 2, 0, 3).reshape(rows, n, v),
      ((0, pad), (0, 0), (0, 0)))
  history_RxW = jnp.pad(jnp.repeat(tokens_BxW, w, axis=0), ((0, pad), (0, 0)))
  length_R = jnp.pad(jnp.tile(jnp.arange(1, w + 1, dtype=jnp.int32), b),
                     (0, pad))

  def orders(chunk):
    logits_CxNxV, history_CxW, length_C = chunk
    return dynamo_sample(jax.random.PRNGKey(0), logits_CxNxV, history_CxW,
                         length_C, cooc, n=n, k=k, temperature=temperature,
                         eps_b=eps_b, repetition_penalty=repetition_penalty,
                         greedy=True).m_B

  chunks = (logits_RxNxV.reshape(-1, _SAMPLER_ROWS, n, v),
            history_RxW.reshape(-1, _SAMPLER_ROWS, w),
            length_R.reshape(-1, _SAMPLER_ROWS))
  m_R = jax.lax.map(orders, chunks).reshape(-1)[:rows]
  return nll, m_R.reshape(b, w)


def _batches(docs, windows, n, window, batch_size) -> Iterator:
  """(tokens [B, W], targets [N, B, W] with -1 where not scored, rows)."""
  for i in range(0, len(windows), batch_size):
    chunk = windows[i:i + batch_size]
    tokens = np.zeros((batch_size, window), np.int32)
    targets = np.full((n, batch_size, window), -1, np.int32)
    for b, w in enumerate(chunk):
      doc = docs[w.doc]
      piece = doc[w.start:w.start + window]
      tokens[b, :piece.size] = piece
      for h in range(1, n + 1):
        t = np.arange(w.first, w.last)
        idx = w.start + t + h
        ok = idx < doc.size
        targets[h - 1, b, t[ok]] = doc[idx[ok]]
    yield tokens, targets, len(chunk)


def head_nll(config: PythiaConfig, params: Params, stream: np.ndarray, *,
             eos_id: int, window: int = 256, stride: int | None = None,
             batch_size: int = 8) -> np.ndarray:
  """Per-position NLLs: float64 [N, X] over the X scored positions of the
  stream (in stream order), NaN where head n's target lies past the
  document's end."""
  return _scan(config, params, stream, eos_id=eos_id, window=window,
               stride=stride, batch_size=batch_size)[0]


def _scan(config, params, stream, *, eos_id, window, stride, batch_size,
          orders=None, progress=False):
  """(nll float64 [N, X], m int32 [X] or None, scored positions per
  document). `orders`: None, or the sampler's settings as a dict (cooc,
  eps_b, temperature, repetition_penalty, k) to also return m."""
  n = config.num_token_heads
  stride = window if stride is None else stride
  if window > config.max_position_embeddings:
    raise InputError(f"window {window} exceeds max_position_embeddings "
                     f"{config.max_position_embeddings}.")
  docs = split_documents(stream, eos_id)
  windows = make_windows([d.size for d in docs], window, stride)
  if not windows:
    raise InputError("the stream has no position to score (no document of "
                     "two or more tokens).")
  batches = list(_batches(docs, windows, n, window, batch_size))
  rows, m_rows = [], []
  for (_, targets, used), (nll, m) in zip(
      batches, _score(config, params, batches, orders, progress)):
    nll = np.where(targets >= 0, np.asarray(nll, np.float64), np.nan)
    for b in range(used):
      w = windows[len(rows)]
      rows.append(nll[:, b, w.first:w.last])
      if orders is not None:
        m_rows.append(m[b, w.first:w.last])
  sizes = [max(d.size - 1, 0) for d in docs]
  return (np.concatenate(rows, axis=1),
          np.concatenate(m_rows) if orders is not None else None, sizes)


def _score(config, params, batches, orders, progress):
  """[(nll float32 [N, B, W], m int32 [B, W] or None)] of every batch, in
  order. In a multi-process run process p scores batches p, p + P, ... and
  every process receives all of them; each batch is computed by the same
  program as by one process, so the results are the same bits."""
  count, index = jax.process_count(), jax.process_index()
  mine = batches[index::count]
  out = []
  bar = tqdm(total=sum(used for _, _, used in mine), desc="scoring",
             unit="window", disable=not progress or index != 0)
  for tokens, targets, used in mine:
    if orders is None:
      nll = _window_nll(config, params, jnp.asarray(tokens),
                        jnp.asarray(targets))
      m = None
    else:
      nll, m = _window_nll_orders(config, params, jnp.asarray(tokens),
                                  jnp.asarray(targets), **orders)
      m = np.asarray(m)
    out.append((np.asarray(nll, np.float32), m))
    bar.update(used)
  bar.close()
  if count == 1:
    return out
  return _gather_batches(out, batches, count, orders is not None)


def _gather_batches(mine, batches, count, with_m):
  """Every process's `_score` results, in batch order: padded to the same
  number of batches per process, stacked, all-gathered."""
  # pylint: disable-next=import-outside-toplevel
  from dynamo_jax import distributed
  total = len(batches)
  shape_NxBxW = batches[0][1].shape
  per = -(-total // count)
  nll_NbxNxBxW = np.zeros((per,) + shape_NxBxW, np.float32)
  m_NbxBxW = np.zeros((per,) + shape_NxBxW[1:], np.int32)
  for i, (nll, m) in enumerate(mine):
    nll_NbxNxBxW[i] = nll
    if m is not None:
      m_NbxBxW[i] = m
  nll_PrxNbxNxBxW = distributed.allgather(nll_NbxNxBxW)
  m_PrxNbxBxW = distributed.allgather(m_NbxBxW) if with_m else None
  return [(nll_PrxNbxNxBxW[i % count, i // count],
           m_PrxNbxBxW[i % count, i // count] if with_m else None)
          for i in range(total)]


def dynamic_perplexity(nll_NxX: np.ndarray, m_X: np.ndarray,
                       doc_positions: list[int]) -> dict[str, float]:
  """PPL_d and its tokens per pass from per-position NLLs, orders and the
  scored positions of each document (in stream order), by the walk in the
  module docstring."""
  total, tokens, tuples, start = 0.0, 0, 0, 0
  for size in doc_positions:
    t = 0
    while t < size:
      m = int(min(m_X[start + t], size - t))
      total += float(nll_NxX[:m, start + t].sum())
      tokens += m
      tuples += 1
      t += m
    start += size
  return {"ppl_d": math.exp(total / tokens),
          "tokens_per_pass_d": tokens / tuples}


def perplexities(nll_NxX: np.ndarray) -> dict[str, float]:
  """PPL_n and PPL_1:n (n >= 2) from `head_nll`'s output."""
  n = nll_NxX.shape[0]
  out = {}
  for h in range(1, n + 1):
    valid = ~np.isnan(nll_NxX[h - 1])
    out[f"ppl_{h}"] = math.exp(float(nll_NxX[h - 1][valid].mean()))
  for h in range(2, n + 1):
    valid = ~np.isnan(nll_NxX[h - 1])  # t+h in the document: so are t+1..t+h-1
    joint = nll_NxX[:h, valid].mean(axis=0)
    out[f"ppl_1:{h}"] = math.exp(float(joint.mean()))
  out["positions"] = int(nll_NxX.shape[1])
  return out


def evaluate(config: PythiaConfig, params: Params, stream: np.ndarray, *,
             eos_id: int, window: int = 256, stride: int | None = None,
             batch_size: int = 8) -> dict[str, float]:
  """`perplexities(head_nll(...))`: PPL_1..PPL_N, PPL_1:2..PPL_1:N."""
  return perplexities(head_nll(config, params, stream, eos_id=eos_id,
                               window=window, stride=stride,
                               batch_size=batch_size))


def evaluate_dynamic(config: PythiaConfig, params: Params, stream: np.ndarray,
                     *, eos_id: int, eps_b: float, cooc=None,
                     temperature: float = 0.7, repetition_penalty: float = 1.1,
                     k: int = 50, window: int = 256, stride: int | None = None,
                     batch_size: int = 8, progress: bool = False) -> dict:
  """PPL_1..PPL_N, PPL_1:2..PPL_1:N and PPL_d at `eps_b` in one pass over
  the stream; `cooc` is None or a CoocTable (Algorithm 1's table)."""
  if config.num_token_heads < 2:
    raise InputError("PPL_d needs a DynaMo model (num_token_heads >= 2).")
  if isinstance(cooc, CoocTable):
    cooc = lookup.device_table(cooc)
  orders = dict(cooc=cooc, eps_b=jnp.float32(eps_b),
                temperature=jnp.float32(temperature),
                repetition_penalty=jnp.float32(repetition_penalty),
                k=min(int(k), config.vocab_size))
  nll, m, sizes = _scan(config, params, stream, eos_id=eos_id, window=window,
                        stride=stride, batch_size=batch_size, orders=orders,
                        progress=progress)
  out = perplexities(nll)
  tokens = out.pop("positions")
  out.update(dynamic_perplexity(nll, m, sizes))
  out.update(eps_b=float(eps_b), tokens_scored=tokens,
             documents=sum(1 for x in sizes if x))
  return out
