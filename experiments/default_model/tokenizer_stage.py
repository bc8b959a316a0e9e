"""Stage `tokenizer`: a byte-level BPE trained on the train split, and the
splits encoded with it into EOS-separated uint16 token arrays.

The tokenizer is GPT-2 / Pythia style (byte-level pre-tokenizer and decoder,
so any text round-trips) with `<|endoftext|>` as id 0, Pythia's EOS id. It is
saved with `PreTrainedTokenizerFast.save_pretrained`, so the directory holds a
standard tokenizer.json plus tokenizer_config.json and
`transformers.AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
import transformers

import corpus

VOCAB_SIZE = 4096
EOS = "<|endoftext|>"


def train_tokenizer(work: str) -> str:
  """Trains on WORK/corpus/train; writes WORK/tokenizer; returns its path."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=[EOS], min_frequency=2,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train(corpus.split_files(work, "train"), trainer)
  if tok.token_to_id(EOS) != 0:
    raise AssertionError("EOS must be id 0 (Pythia's EOS id).")
  out = os.path.join(work, "tokenizer")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
  fast.save_pretrained(out)
  return out


# Train documents are whole plays and books (up to ~120k tokens), and the
# trainer shuffles documents, then packs them: a 32-row batch would be one
# contiguous slice of one work, and training would visit the works one after
# another. Cutting train documents at blank lines (speeches, stanzas,
# chapters) into pieces of at least this many tokens lets every batch mix
# ~20 places of the corpus; the cost is an EOS after each piece, at a
# paragraph end. Validation and test keep whole documents.
TRAIN_PIECE_MIN_TOKENS = 384
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def paragraph_pieces(text: str, enc, min_tokens: int) -> list[np.ndarray]:
  """The document's token ids cut at blank lines into pieces of at least
  `min_tokens` (the last piece takes any short remainder). Cuts fall on
  token boundaries of the whole-document encoding, so the pieces
  concatenate back to it exactly."""
  ids = np.asarray(enc.ids, np.uint16)
  starts = np.asarray([o[0] for o in enc.offsets])
  cuts, last = [], 0
  for m in _PARAGRAPH.finditer(text):
    j = int(np.searchsorted(starts, m.end()))
    if j - last >= min_tokens and ids.size - j >= min_tokens:
      cuts.append(j)
      last = j
  return np.split(ids, cuts)


def encode_splits(work: str) -> dict[str, int]:
  """WORK/tokens/{split}.npy: uint16 ids, every document (train: every
  paragraph piece, see TRAIN_PIECE_MIN_TOKENS) followed by EOS.
  Returns tokens per split, and the number of train pieces."""
  tok = tokenizers.Tokenizer.from_file(
      os.path.join(work, "tokenizer", "tokenizer.json"))
  eos = tok.token_to_id(EOS)
  os.makedirs(os.path.join(work, "tokens"), exist_ok=True)
  counts = {}
  for split in corpus.SPLITS:
    texts = []
    for path in corpus.split_files(work, split):
      with open(path) as fh:
        texts.append(fh.read())
    pieces = []
    for text, enc in zip(texts, tok.encode_batch(texts)):
      docs = ([np.asarray(enc.ids, np.uint16)] if split != "train" else
              paragraph_pieces(text, enc, TRAIN_PIECE_MIN_TOKENS))
      for doc in docs:
        pieces += [doc, np.asarray([eos], np.uint16)]
      if split == "train":
        counts["train_pieces"] = counts.get("train_pieces", 0) + len(docs)
    ids = np.concatenate(pieces)
    np.save(os.path.join(work, "tokens", f"{split}.npy"), ids)
    counts[split] = int(ids.size)
  with open(os.path.join(work, "tokens", "counts.json"), "w") as fh:
    json.dump(counts, fh, indent=1)
  return counts
