"""`make_batches`: the trainer's entry point, with background prefetch."""

from __future__ import annotations

import queue
import threading
from typing import Any

from dynamo_jax.data.config import DataConfig, DataError
from dynamo_jax.data.packing import PackedBatches
from dynamo_jax.data.tokenize import make_encoder, resolve_eos_id

_END = object()  # Sentinel from the producer thread: the data is spent.


def make_batches(data_cfg: DataConfig, tokenizer: Any, *, batch_size: int,
                 seq_len: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> "BatchIterator":
  """Packed training batches (of this process's share of the documents
  when `process_count` > 1; the trainer uses the whole, see data/__init__).

  Args:
    data_cfg: the source and its options.
    tokenizer: a `tokenizers.Tokenizer`, a transformers tokenizer, or any
      object with `encode(text) -> list[int]`; may be None for the "tokens"
      source when `data_cfg.eos_id` is set.
    batch_size: rows per batch of this iterator.
    seq_len: tokens per row.
    seed: fixes the document order; equal seeds give equal batches.
    process_index, process_count: this host and the number of hosts
      (`jax.process_index()`, `jax.process_count()`): each host reads a
      disjoint share of the documents.

  Returns:
    An iterator of {"tokens": int32 [batch_size, seq_len], "segment_ids":
    int32 [batch_size, seq_len]} with `get_state()` / `set_state(state)`.
  """
  if tokenizer is None and not (data_cfg.source == "tokens"
                                and data_cfg.eos_id is not None):
    raise DataError(f"source {data_cfg.source!r} needs a tokenizer (only "
                    "'tokens' with an explicit eos_id can go without).")
  eos_id = resolve_eos_id(tokenizer, data_cfg.eos_id)
  if data_cfg.source == "instructions":
    # The chat package renders and tokenizes them (it imports data, not the
    # other way round).
    raise DataError("source 'instructions' is read by "
                    "dynamo_jax.chat.instructions.make_batches.")
  if data_cfg.source == "tfds":
    from dynamo_jax.data.tfds_source import TfdsSource  # tfds only when asked.
    source = TfdsSource(data_cfg)
  else:
    from dynamo_jax.data.files import open_file_source
    source = open_file_source(data_cfg, eos_id)
  encode = None if tokenizer is None else make_encoder(tokenizer)
  packer = PackedBatches(
      source, encode, eos_id=eos_id, batch_size=batch_size, seq_len=seq_len,
      seed=seed, shuffle=data_cfg.shuffle, num_epochs=data_cfg.num_epochs,
      process_index=process_index, process_count=process_count)
  return BatchIterator(packer, prefetch=data_cfg.prefetch)


class BatchIterator:
  """Iterates over batches; `get_state()` is the state after the last batch
  handed out, whatever the prefetch thread has prepared beyond it.

  With `prefetch` > 0 a daemon thread keeps up to that many batches ready
  (Rust tokenizers release the GIL, so this overlaps the training step). The
  thread starts on the first `next`, so `set_state` right after construction
  costs nothing; a later `set_state` stops and discards it.
  """

  def __init__(self, packer: PackedBatches, prefetch: int):
    self._packer = packer
    self._prefetch = prefetch
    self._state = packer.get_state()
    self._thread = None
    self._queue = None
    self._stop = None

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    if not self._prefetch:
      batch = self._packer.next_batch()
      if batch is None:
        raise StopIteration
      self._state = self._packer.get_state()
      return batch
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # Every later `next` stops as well.
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict; `set_state` on an iterator made with
    the same arguments resumes right after the last batch returned."""
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._packer.set_state(state)
    self._state = self._packer.get_state()

  def close(self) -> None:
    """Stops the prefetch thread, if any; a later `next` goes on from the
    last batch returned."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      # The thread ran ahead: rewind to what the caller has seen.
      self._packer.set_state(self._state)

  def __del__(self):
    if getattr(self, "_stop", None) is not None:
      self._stop.set()

  def _start(self) -> None:
    # The thread sees only these locals, never `self`, so an abandoned
    # iterator is collected and its __del__ stops the thread.
    packer, stop = self._packer, threading.Event()
    q = queue.Queue(self._prefetch)
    self._queue, self._stop = q, stop

    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    def produce():
      try:
        while not stop.is_set():
          batch = packer.next_batch()
          if batch is None:
            put(_END)
            return
          if not put((batch, packer.get_state())):
            return
      except BaseException as e:  # Re-raised in the consumer's thread.
        put(e)

    self._thread = threading.Thread(target=produce, daemon=True,
                                    name="dynamo-data-prefetch")
    self._thread.start()
