"""Packing for instruction tuning: whole examples, kept apart, with a mask of
the tokens that count as targets.

Each example (prompt + response tokens, `chat.instructions`) is its own
segment: segment ids number a row's examples from 1, 0 marks padding, and
`training.loss.shifted_targets` never lets a target cross a segment, so no
head ever predicts one example from another. Unlike pre-training packing, an
example never straddles two rows: one that does not fit in what is left of a
row starts the next row, and the rest of the row is padding. An example
longer than `seq_len` is cut to its first `seq_len` tokens (the end of its
response is lost; a note on stderr says so the first time).

Order, epochs and the resumable cursor are PackedBatches': the state is
(epoch, position), `token_offset` is always 0 because examples are whole.
"""

from __future__ import annotations

import sys

import numpy as np

from dynamo_jax.data.packing import PackedBatches


class InstructionBatches(PackedBatches):
  """`next_batch()`: {"tokens", "segment_ids", "loss_mask"} [B, T] or None.

  source: `len()` and `read(indices) -> [(ids int32 [L], loss_mask bool
  [L])]` (a `chat.instructions.InstructionSource`).
  """

  def __init__(self, source, *, batch_size: int, seq_len: int, seed: int,
               shuffle: bool, num_epochs: int | None, process_index: int = 0,
               process_count: int = 1):
    # No encoder and no EOS to append: the source yields finished examples
    # whose response ends with the template's EOS.
    super().__init__(source, None, eos_id=-1, batch_size=batch_size,
                     seq_len=seq_len, seed=seed, shuffle=shuffle,
                     num_epochs=num_epochs, process_index=process_index,
                     process_count=process_count)
    self._noted_truncation = False

  def _example(self):
    """(ids, loss_mask) at the cursor, or None when done."""
    if self._finished():
      return None
    return self._ids_at(self._epoch_order(), self._position)

  def next_batch(self) -> dict[str, np.ndarray] | None:
    shape = (self._batch_size, self._seq_len)
    tokens_BxT = np.zeros(shape, np.int32)
    segment_ids_BxT = np.zeros(shape, np.int32)
    loss_mask_BxT = np.zeros(shape, bool)
    written = 0
    for row in range(self._batch_size):
      col, segment = 0, 0
      while col < self._seq_len:
        example = self._example()
        if example is None:
          break
        ids, mask = example
        take = min(len(ids), self._seq_len)
        if col + take > self._seq_len:
          break  # starts the next row, whole
        if take < len(ids) and not self._noted_truncation:
          self._noted_truncation = True
          print(f"note: an instruction example of {len(ids)} tokens is "
                f"longer than seq_len={self._seq_len}; such examples are cut "
                "to their first seq_len tokens.", file=sys.stderr, flush=True)
        segment += 1
        tokens_BxT[row, col:col + take] = ids[:take]
        loss_mask_BxT[row, col:col + take] = mask[:take]
        segment_ids_BxT[row, col:col + take] = segment
        col += take
        written += take
        self._advance()
    if not written:
      return None
    return {"tokens": tokens_BxT, "segment_ids": segment_ids_BxT,
            "loss_mask": loss_mask_BxT}
