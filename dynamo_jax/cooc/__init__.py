"""Co-occurrence statistics for DynaMo decoding (paper Algorithm 1, step 4).

  count_ngrams(docs, vocab_size, max_order, *, min_count=1, ...) -> CoocTable
  count_stream(chunks, vocab_size, max_order, ...)  (one document in pieces)
  NgramCounter(vocab_size, max_order, ...).add(ids, end_of_document=...)
  CoocTable.save(path) / load(path)   versioned .npz, written atomically
  vocab_hash(tokenizer_or_vocab), check_compatible(table, vocab_hash=...,
      vocab_size=..., num_heads=...)
  to_device(table) -> pytree; grid_weights(arrays, topk_ids_BxMxK, alpha)
      -> float32 [B, K, ..., K] inside jit; grid_weights_numpy: reference
  device_table(table, lookup="xla") -> DeviceTable (cached per table), a
      pytree with .grid_weights(ids, alpha): the sampler's interface;
      lookup="native" reads it with the C++ kernel (kernels/cpu_cooc.py,
      CPU only, the same bits);
      table.check_compatible(...)
"""

from dynamo_jax.cooc.count import NgramCounter, count_ngrams, count_stream
from dynamo_jax.cooc.keys import check_fits
from dynamo_jax.cooc.lookup import (DeviceTable, device_table, grid_weights,
                                    grid_weights_numpy, to_device)
from dynamo_jax.cooc.table import (FORMAT_VERSION, CoocTable,
                                   check_compatible, load, vocab_hash)
