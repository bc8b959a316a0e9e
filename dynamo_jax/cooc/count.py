"""Streaming, exact counting of contiguous n-grams in bounded memory.

Documents are counted independently: no n-gram spans two documents. A long
document may be fed in pieces (`NgramCounter.add(piece, end_of_document=False)`
or `count_stream`); n-grams spanning two pieces of one document are counted.

Tokens are buffered up to `chunk_tokens`; each full buffer becomes, per order
m >= 2, one sorted run of (key, count) (see `keys.py` for the key), computed
in worker threads while the caller produces the next buffer. Runs are merged
and spilled to disk within `memory_budget_bytes` (`runs.RunStore`). Pruning
happens once, on the final merged counts: the result holds exactly the
n-grams whose total count is >= min_count, the same as a brute-force count
filtered afterwards. Unigram counts are dense over the vocabulary and never
pruned (they are the denominators of the co-occurrence weights).

Counting split over processes (hosts): each counts its share of the
documents into an unpruned table, `save_partial` writes it to a directory
all of them share, and one process's `merge_partials` sums them with the
same final merge and pruning, giving the table one process would count.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Iterable

import numpy as np
import tqdm

from dynamo_jax import fileio
from dynamo_jax.cooc import keys as keys_lib
from dynamo_jax.cooc import runs
from dynamo_jax.cooc.table import CoocTable
from dynamo_jax.errors import InputError

DEFAULT_CHUNK_TOKENS = 1 << 23
DEFAULT_MEMORY_BUDGET = 1 << 30


def _order_run(buf_N: np.ndarray, start: int, breaks: np.ndarray,
               order: int, vocab_size: int) -> runs.Run:
  """The run of the order-m windows of buf_N[start:] that cross no break.

  `breaks` are the positions in buf_N[start:] where a new document begins.
  """
  keys = keys_lib.window_keys(buf_N[start:], order, vocab_size)
  if breaks.size and keys.size:
    bad = (breaks[:, None] - np.arange(1, order)[None, :]).ravel()
    bad = bad[(bad >= 0) & (bad < keys.size)]
    if bad.size:
      keep = np.ones(keys.size, bool)
      keep[bad] = False
      keys = keys[keep]
  return runs.from_keys(keys)


class NgramCounter:
  """Counts n-grams of orders 1..max_order over documents added in pieces.

  Use as a context manager (or call `close`) so that spilled runs are
  deleted even when counting fails; `finish` closes too.
  """

  def __init__(self, vocab_size: int, max_order: int = 3, *,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
               spill_dir: str | None = None, threads: int | None = None,
               progress: tqdm.tqdm | None = None):
    """
    Args:
      vocab_size: token ids must lie in [0, vocab_size).
      max_order: the largest n counted; orders 1..max_order are counted.
      chunk_tokens: tokens per sorted run (the unit of work of a thread).
      memory_budget_bytes: budget of the runs of all orders together; runs
        beyond it are merged, then spilled to disk. Peak memory is about
        twice the budget plus ~60 bytes per chunk token (chunk buffers and
        sort keys of every order in flight).
      spill_dir: where spilled runs go (default: the system temp dir).
      threads: worker threads (default: the number of CPUs).
      progress: a tqdm bar to advance by the tokens added, or None.
    """
    keys_lib.check_fits(vocab_size, max_order)
    if chunk_tokens < 1:
      raise InputError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    self.vocab_size = vocab_size
    self.max_order = max_order
    self.chunk_tokens = chunk_tokens
    self._progress = progress
    orders = range(2, max_order + 1)
    per_order = memory_budget_bytes // max(1, max_order - 1)
    self._stores = {m: runs.RunStore(per_order, spill_dir) for m in orders}
    self._pool = concurrent.futures.ThreadPoolExecutor(
        threads or os.cpu_count() or 1)
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._unigrams = np.zeros(vocab_size, np.int64)
    self._positions = {m: 0 for m in range(1, max_order + 1)}
    # The last max_order - 1 tokens flushed, while their document is open.
    self._tail = np.zeros(0, np.int64)
    self._pieces: list[np.ndarray] = []
    self._breaks: list[int] = []  # buffer offsets where a document starts
    self._buffered = 0
    self._open = False  # the last piece's document continues
    self.num_documents = 0

  def __enter__(self) -> NgramCounter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def add(self, ids: np.ndarray, *, end_of_document: bool = True) -> None:
    """Adds a 1-D array of token ids: a whole document, or the next piece of
    one when end_of_document=False (the next `add` continues it)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer)
                             or ids.size == 0):
      raise InputError(f"expected a 1-D array of integer token ids, got "
                       f"shape {ids.shape} dtype {ids.dtype}.")
    if not self._open:  # a new document
      self.num_documents += 1
      if self._buffered:
        self._breaks.append(self._buffered)
      else:
        self._tail = self._tail[:0]  # the tail's document has ended
    for start in range(0, ids.size, self.chunk_tokens):
      piece = ids[start:start + self.chunk_tokens]
      self._check_range(piece)
      self._pieces.append(piece)
      self._buffered += piece.size
      if self._buffered >= self.chunk_tokens:
        self._flush()
      if self._progress is not None:
        self._progress.update(piece.size)
    self._open = not end_of_document

  def _check_range(self, piece: np.ndarray) -> None:
    if not piece.size:
      return
    lo, hi = int(piece.min()), int(piece.max())
    if lo < 0 or hi >= self.vocab_size:
      raise InputError(
          f"token id {lo if lo < 0 else hi} is outside the vocabulary "
          f"[0, {self.vocab_size}); pass the tokenizer's vocabulary size (or "
          "check the data's dtype).")

  def _flush(self) -> None:
    """Hands the buffered tokens to the worker threads as one chunk."""
    if not self._buffered:
      return
    n_tail = self._tail.size
    buf = np.concatenate([self._tail] + self._pieces, dtype=np.int64)
    breaks = np.asarray(self._breaks, np.int64) + n_tail
    self._unigrams += np.bincount(buf[n_tail:], minlength=self.vocab_size)
    self._positions[1] += self._buffered
    key_buf = buf.view(np.uint64)  # ids are >= 0, so the bits agree
    for m, store in self._stores.items():
      # Windows must end in the new tokens: those inside the tail were
      # counted with the previous chunk.
      start = max(0, n_tail - (m - 1))
      m_breaks = breaks - start
      self._positions[m] += self._num_windows(buf.size - start, m_breaks, m)
      if m in self._pending:
        self._pending.pop(m).result()  # one run per order at a time: in order
      self._pending[m] = self._pool.submit(self._count_order, store, key_buf,
                                           start, m_breaks, m)
    last_start = int(breaks[-1]) if breaks.size else 0
    keep = max(last_start, buf.size - (self.max_order - 1))
    self._tail = buf[keep:].copy()
    self._pieces, self._breaks, self._buffered = [], [], 0

  def _count_order(self, store, key_buf, start, breaks, m) -> None:
    store.add(_order_run(key_buf, start, breaks, m, self.vocab_size))

  @staticmethod
  def _num_windows(n: int, breaks: np.ndarray, order: int) -> int:
    """Windows of `order` tokens in n tokens cut into documents at breaks."""
    bounds = np.concatenate([[0], breaks, [n]])
    return int(np.maximum(np.diff(bounds) - (order - 1), 0).sum())

  def finish(self, min_count: int = 1, **metadata) -> CoocTable:
    """The table of all counts, n-grams of order >= 2 pruned to totals >=
    min_count. `metadata` goes to CoocTable (vocab_hash, corpus). Closes."""
    if not isinstance(min_count, (int, np.integer)) or min_count < 1:
      raise InputError(f"min_count must be an integer >= 1, got {min_count!r}.")
    try:
      self._flush()
      for m in list(self._pending):
        self._pending.pop(m).result()
      futures = {m: self._pool.submit(s.finish, int(min_count))
                 for m, s in self._stores.items()}
      ngrams = {m: f.result() for m, f in futures.items()}
    finally:
      self.close()
    return CoocTable(
        vocab_size=self.vocab_size, max_order=self.max_order,
        unigram_counts=self._unigrams,
        keys={m: k for m, (k, _) in ngrams.items()},
        counts={m: c for m, (_, c) in ngrams.items()},
        positions=dict(self._positions), num_documents=self.num_documents,
        min_count=int(min_count), **metadata)

  def close(self) -> None:
    """Stops the workers and deletes spilled runs."""
    for f in self._pending.values():
      f.cancel()
    self._pending = {}
    self._pool.shutdown(wait=True)
    for store in self._stores.values():
      store.close()

  def stats(self) -> dict:
    """Merges and spills so far, per order (for logs and benchmarks)."""
    return {m: {"merges": s.merges, "spills": s.spills}
            for m, s in self._stores.items()}


def _partial_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"part{index}")


def save_partial(table: CoocTable, directory: str, index: int) -> None:
  """Writes an unpruned (min_count 1) table as part `index` of a count
  split over processes: a run file pair per order, the unigram counts, and
  last, as the sign that the part is whole, its positions and documents."""
  if table.min_count != 1:
    raise ValueError("a partial table must be unpruned (min_count 1): "
                     "pruning applies to the merged totals.")
  base = _partial_path(directory, index)
  for m in range(2, table.max_order + 1):
    runs.DiskRun(f"{base}.order{m}",
                 (np.asarray(table.keys[m], np.uint64),
                  np.asarray(table.counts[m], np.int64)))
  np.save(f"{base}.unigrams.npy", np.asarray(table.unigram_counts, np.int64))
  meta = {"positions": {str(m): int(p) for m, p in table.positions.items()},
          "num_documents": int(table.num_documents)}
  fileio.atomic_write_text(f"{base}.json", json.dumps(meta))


def merge_partials(directory: str, parts: int, vocab_size: int,
                   max_order: int, min_count: int = 1,
                   **metadata) -> CoocTable:
  """The table of parts 0..parts-1 in `directory` (`save_partial`): counts
  summed, n-grams of order >= 2 pruned to totals >= min_count, streamed
  from disk in blocks as `NgramCounter.finish` streams spilled runs.
  `metadata` goes to CoocTable (vocab_hash, corpus)."""
  if not isinstance(min_count, (int, np.integer)) or min_count < 1:
    raise InputError(f"min_count must be an integer >= 1, got {min_count!r}.")
  unigrams = np.zeros(vocab_size, np.int64)
  positions = {m: 0 for m in range(1, max_order + 1)}
  num_documents = 0
  for i in range(parts):
    base = _partial_path(directory, i)
    if not os.path.isfile(f"{base}.json"):
      raise InputError(f"part {i} of the counts is missing from {directory} "
                       f"(did process {i} finish counting?).")
    with open(f"{base}.json") as fh:
      meta = json.load(fh)
    for m in positions:
      positions[m] += int(meta["positions"][str(m)])
    num_documents += int(meta["num_documents"])
    unigrams += np.load(f"{base}.unigrams.npy", allow_pickle=False)
  keys, counts = {}, {}
  for m in range(2, max_order + 1):
    keys[m], counts[m] = runs.merge(
        [runs.DiskRun(f"{_partial_path(directory, i)}.order{m}")
         for i in range(parts)], int(min_count))
  return CoocTable(vocab_size=vocab_size, max_order=max_order,
                   unigram_counts=unigrams, keys=keys, counts=counts,
                   positions=positions, num_documents=num_documents,
                   min_count=int(min_count), **metadata)


def _count(items, end_of_document: bool, vocab_size: int, max_order: int, *,
           min_count: int = 1, progress: bool = False,
           total_tokens: int | None = None, vocab_hash: str | None = None,
           corpus: str = "", **counter_kwargs) -> CoocTable:
  bar = None
  if progress:
    bar = tqdm.tqdm(total=total_tokens, unit="tok", unit_scale=True,
                    desc="counting n-grams", smoothing=0.1)
  try:
    with NgramCounter(vocab_size, max_order, progress=bar,
                      **counter_kwargs) as counter:
      for ids in items:
        counter.add(ids, end_of_document=end_of_document)
      return counter.finish(min_count, vocab_hash=vocab_hash, corpus=corpus)
  finally:
    if bar is not None:
      bar.close()


def count_ngrams(docs: Iterable[np.ndarray], vocab_size: int,
                 max_order: int = 3, *, min_count: int = 1,
                 progress: bool = False, total_tokens: int | None = None,
                 vocab_hash: str | None = None, corpus: str = "",
                 **counter_kwargs) -> CoocTable:
  """Counts n-grams where each item of `docs` is one whole document.

  Args:
    docs: 1-D integer arrays of token ids, one per document; no n-gram spans
      two of them.
    vocab_size, max_order: as in `NgramCounter`.
    min_count: n-grams of order >= 2 whose total count is below it are
      dropped, once, from the final counts (default 1 keeps all).
    progress: show a tqdm bar, with an ETA when total_tokens is given.
    total_tokens: the number of tokens in docs, if known (for the ETA).
    vocab_hash, corpus: metadata recorded in the table.
    **counter_kwargs: NgramCounter's chunk_tokens, memory_budget_bytes,
      spill_dir, threads.
  """
  return _count(docs, True, vocab_size, max_order, min_count=min_count,
                progress=progress, total_tokens=total_tokens,
                vocab_hash=vocab_hash, corpus=corpus, **counter_kwargs)


def count_stream(chunks: Iterable[np.ndarray], vocab_size: int,
                 max_order: int = 3, *, min_count: int = 1,
                 progress: bool = False, total_tokens: int | None = None,
                 vocab_hash: str | None = None, corpus: str = "",
                 **counter_kwargs) -> CoocTable:
  """Counts n-grams of ONE document given as consecutive chunks, so n-grams
  spanning chunk boundaries are counted. Arguments as `count_ngrams`."""
  return _count(chunks, False, vocab_size, max_order, min_count=min_count,
                progress=progress, total_tokens=total_tokens,
                vocab_hash=vocab_hash, corpus=corpus, **counter_kwargs)
