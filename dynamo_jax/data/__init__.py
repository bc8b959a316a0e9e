"""Training data: documents -> tokens + EOS -> packed rows with segment ids.

  it = make_batches(DataConfig(source="tfds", name="tiny_shakespeare"),
                    tokenizer, batch_size=8, seq_len=2048, seed=0)
  batch = next(it)  # {"tokens", "segment_ids"}: int32 [batch_size, seq_len]
  state = it.get_state()  # small JSON dict; it2.set_state(state) resumes

The trainer builds the whole global batch on every process and feeds each
device its rows (training/loop.py), so batches do not depend on the host
count; `process_index` / `process_count` give a disjoint per-host share of
the documents instead, for readers that want one.

Sources (`DataConfig.source`): "tfds" (TensorFlow Datasets, read with
`tfds.data_source`, no TensorFlow needed), "text" and "jsonl" files, and
pre-tokenized "tokens" files (.npy / raw .bin, documents separated by EOS).
"instructions" (Alpaca records for chat fine-tuning) is read by
`dynamo_jax.chat.instructions.make_batches`, with its own packing
(instruct_packing.py: whole examples, a response-only "loss_mask").
All are random-access sequences of documents (files are indexed by one scan
at open), so the order is a true per-epoch permutation of all documents
rather than a shuffle buffer, and the resumable state is a cursor into it:
see packing.py.
"""

from dynamo_jax.data.config import DataConfig, DataError
from dynamo_jax.data.pipeline import BatchIterator, make_batches

__all__ = ["BatchIterator", "DataConfig", "DataError", "make_batches"]
