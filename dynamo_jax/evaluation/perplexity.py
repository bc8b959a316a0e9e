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

Windows. A document longer than the window W is scored in windows starting
every `stride` tokens; a position is scored in the window that gives it the
longest context (the first window scores its first W positions, every later
one only its last `stride`), so each position counts once and has at least
W - stride tokens of context (stride = W: non-overlapping windows). Targets
may lie past a window's end: they are read from the document.

Shapes: N token heads, B windows per batch, W window, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

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
  """Per-position NLLs: float64 [N, P] over the P scored positions of the
  stream (in stream order), NaN where head n's target lies past the
  document's end."""
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
  rows = []
  for tokens, targets, used in _batches(docs, windows, n, window, batch_size):
    nll = np.asarray(_window_nll(config, params, jnp.asarray(tokens),
                                 jnp.asarray(targets)), np.float64)
    nll = np.where(targets >= 0, nll, np.nan)
    for b in range(used):
      w = windows[len(rows)]
      rows.append(nll[:, b, w.first:w.last])
  return np.concatenate(rows, axis=1)


def perplexities(nll_NxP: np.ndarray) -> dict[str, float]:
  """PPL_n and PPL_1:n (n >= 2) from `head_nll`'s output."""
  n = nll_NxP.shape[0]
  out = {}
  for h in range(1, n + 1):
    valid = ~np.isnan(nll_NxP[h - 1])
    out[f"ppl_{h}"] = math.exp(float(nll_NxP[h - 1][valid].mean()))
  for h in range(2, n + 1):
    valid = ~np.isnan(nll_NxP[h - 1])  # t+h in the document: so are t+1..t+h-1
    joint = nll_NxP[:h, valid].mean(axis=0)
    out[f"ppl_1:{h}"] = math.exp(float(joint.mean()))
  out["positions"] = int(nll_NxP.shape[1])
  return out


def evaluate(config: PythiaConfig, params: Params, stream: np.ndarray, *,
             eos_id: int, window: int = 256, stride: int | None = None,
             batch_size: int = 8) -> dict[str, float]:
  """`perplexities(head_nll(...))`: PPL_1..PPL_N, PPL_1:2..PPL_1:N."""
  return perplexities(head_nll(config, params, stream, eos_id=eos_id,
                               window=window, stride=stride,
                               batch_size=batch_size))
