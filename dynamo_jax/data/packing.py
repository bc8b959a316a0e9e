"""Document order, host sharding and greedy packing, with a resumable cursor.

Order: epoch e visits the documents in a permutation drawn from (seed, e)
(or in file order when not shuffling); every host draws the same
permutation and takes every `process_count`-th entry from `process_index`
on, so the hosts' documents are disjoint and together are all of them.

Packing: the host's documents, each followed by EOS, are laid end to end and
cut into rows of `seq_len`; a document that does not fit continues at the
start of the next row, under a new segment id there. Only the end of the
last epoch leaves padding (token 0, segment 0).

State: since a batch is only handed out whole, everything the next batch
depends on is the cursor (epoch, position in the epoch's order, tokens of
that document already emitted): the permutation and the document's tokens
are derived again from it. The state is a few integers, and resuming costs
one permutation and one tokenization.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from dynamo_jax.data.config import DataError

_READ_CHUNK = 32  # documents read and tokenized per call: batched tokenizers


class PackedBatches:
  """Synchronous batch maker; `next_batch()` returns None when done."""

  def __init__(self, source, encode: Callable[[Sequence[str]], list],
               *, eos_id: int, batch_size: int, seq_len: int, seed: int,
               shuffle: bool, num_epochs: int | None, process_index: int,
               process_count: int):
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("process_count", process_count)):
      if not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}.")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} is not in "
                      f"[0, {process_count}).")
    self._source = source
    self._encode = encode
    self._eos_id = eos_id
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._num_epochs = num_epochs
    # Saved with the cursor and checked on set_state: a state from another
    # seed, host layout or data would silently read other documents. Any int
    # works as a seed (SeedSequence wants it non-negative).
    self._identity = dict(seed=int(seed) % 2**64, shuffle=bool(shuffle),
                          process_index=process_index,
                          process_count=process_count,
                          num_documents=len(source))
    if len(source) <= process_index:
      raise DataError(
          f"the data has {len(source)} documents: none for process "
          f"{process_index} of {process_count}. Use more (or smaller) "
          "documents, or fewer processes.")
    self._order_epoch, self._order = -1, None
    self._chunk_start, self._chunk = None, []
    self.set_state(dict(self._identity, epoch=0, position=0, token_offset=0))

  # ---- state ---------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    return dict(self._identity, epoch=self._epoch, position=self._position,
                token_offset=self._token_offset)

  def set_state(self, state: dict[str, Any]) -> None:
    missing = sorted({*self._identity, "epoch", "position", "token_offset"}
                     - set(state))
    if missing:
      raise DataError(f"not a data pipeline state: no keys {missing}.")
    wrong = {k: (state[k], v) for k, v in self._identity.items()
             if state[k] != v}
    if wrong:
      raise DataError(
          "the state was saved by a differently configured pipeline "
          f"(key: (saved, now)): {wrong}.")
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    self._token_offset = int(state["token_offset"])
    if (not 0 <= self._position < len(self._epoch_order())
        or self._token_offset < 0 or self._epoch < 0):
      raise DataError(f"state position {self._position} / token_offset "
                      f"{self._token_offset} is out of range.")

  # ---- order ---------------------------------------------------------------

  def _epoch_order(self) -> np.ndarray:
    """Source indices of this host's documents in epoch `self._epoch`."""
    if self._order_epoch != self._epoch:
      n = self._identity["num_documents"]
      if self._identity["shuffle"]:
        rng = np.random.default_rng([self._identity["seed"], self._epoch])
        everyone = rng.permutation(n)
      else:
        everyone = np.arange(n)
      share = slice(self._identity["process_index"], None,
                    self._identity["process_count"])
      self._order, self._order_epoch = everyone[share], self._epoch
      self._chunk_start, self._chunk = None, []
    return self._order

  def _finished(self) -> bool:
    return self._num_epochs is not None and self._epoch >= self._num_epochs

  def _document(self) -> np.ndarray | None:
    """Token ids (EOS not included) of the document at the cursor, or None
    when done; skips documents without tokens."""
    skipped = 0
    while not self._finished():
      order = self._epoch_order()
      ids = self._ids_at(order, self._position)
      if len(ids):
        if self._token_offset > len(ids):
          raise DataError(
              f"state token_offset {self._token_offset} is past the end of "
              f"document {order[self._position]} ({len(ids)} tokens + EOS): "
              "the data or tokenizer changed since the state was saved.")
        return ids
      skipped += 1
      if skipped > len(order):
        raise DataError("every document of this process's share is empty.")
      self._advance()
    return None

  def _ids_at(self, order: np.ndarray, position: int) -> np.ndarray:
    if (self._chunk_start is None
        or not 0 <= position - self._chunk_start < len(self._chunk)):
      docs = self._source.read(order[position:position + _READ_CHUNK])
      texts = [d for d in docs if isinstance(d, str)]
      encoded = iter(self._encode(texts) if texts else [])
      # Pre-tokenized documents stay memory-map slices: a huge one is never
      # copied whole, only row by row.
      self._chunk = [next(encoded) if isinstance(d, str) else d for d in docs]
      self._chunk_start = position
    return self._chunk[position - self._chunk_start]

  def _advance(self) -> None:
    self._position += 1
    self._token_offset = 0
    if self._position == len(self._epoch_order()):
      self._epoch += 1
      self._position = 0

  # ---- packing -------------------------------------------------------------

  def next_batch(self) -> dict[str, np.ndarray] | None:
    """The next batch, or None when the last epoch is spent.

    Returns:
      {"tokens": int32 [batch_size, seq_len], "segment_ids": int32
      [batch_size, seq_len]}: segment ids number the documents of each row
      from 1, 0 marks padding.
    """
    shape = (self._batch_size, self._seq_len)
    tokens_BxT = np.zeros(shape, np.int32)
    segment_ids_BxT = np.zeros(shape, np.int32)
    written = 0
    for row in range(self._batch_size):
      col, segment = 0, 0
      while col < self._seq_len:
        ids = self._document()
        if ids is None:
          break
        # The document is ids + EOS; this row takes `take` tokens of it from
        # `start`, the EOS being the one after ids[-1].
        start = self._token_offset
        take = min(len(ids) + 1 - start, self._seq_len - col)
        from_ids = min(take, len(ids) - start)
        segment += 1
        tokens_BxT[row, col:col + from_ids] = ids[start:start + from_ids]
        if from_ids < take:
          tokens_BxT[row, col + from_ids] = self._eos_id
        segment_ids_BxT[row, col:col + take] = segment
        col += take
        written += take
        self._token_offset += take
        if self._token_offset == len(ids) + 1:
          self._advance()
    if not written:
      return None
    return {"tokens": tokens_BxT, "segment_ids": segment_ids_BxT}
