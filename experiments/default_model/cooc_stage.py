"""Stage `cooc`: the co-occurrence table (orders 1..3) counted on the train
split, pruned with the smallest min_count that fits the artifact's budget."""

from __future__ import annotations

import os

import numpy as np
import tokenizers

from dynamo_jax import cooc
from dynamo_jax.evaluation import split_documents

MIN_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


def build_table(work: str, budget_bytes: int, max_order: int = 3) -> dict:
  """Writes WORK/cooc.npz, at most `budget_bytes`; returns what it chose."""
  tok = tokenizers.Tokenizer.from_file(
      os.path.join(work, "tokenizer", "tokenizer.json"))
  eos = tok.token_to_id("<|endoftext|>")
  # Documents keep their EOS, as in training: (x, EOS) pairs are real.
  docs = split_documents(np.load(os.path.join(work, "tokens", "train.npy")), eos)
  path = os.path.join(work, "cooc.npz")
  for min_count in MIN_COUNTS:
    table = cooc.count_ngrams(docs, tok.get_vocab_size(), max_order,
                              min_count=min_count,
                              vocab_hash=cooc.vocab_hash(tok),
                              corpus="default_model train split")
    table.save(path)
    size = os.path.getsize(path)
    print(f"cooc min_count={min_count}: {size / 1e6:.2f} MB "
          f"{table.metadata()['num_ngrams']}", flush=True)
    if size <= budget_bytes:
      return {"min_count": min_count, "bytes": size,
              "num_ngrams": table.metadata()["num_ngrams"],
              "budget_bytes": budget_bytes}
  raise RuntimeError(f"no min_count in {MIN_COUNTS} fits the co-occurrence "
                     f"table into {budget_bytes} bytes.")
