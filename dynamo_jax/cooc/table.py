"""`CoocTable`: n-gram counts with their metadata, and its versioned file.

File format (version 1): an uncompressed .npz (numpy zip; no pickled
objects, loaded with allow_pickle=False) holding
  metadata        uint8 [*]   UTF-8 JSON: format, version, vocab_size,
                              max_order, positions, num_documents, min_count,
                              pruning, vocab_hash, corpus
  unigram_counts  uint  [V]   every token's count, never pruned
  keys_<m>        uint64 [R]  sorted m-gram keys, m = 2..max_order (keys.py)
  counts_<m>      uint  [R]   their counts, all >= min_count
Counts are stored as uint32 when they fit, else uint64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from dynamo_jax import fileio
from dynamo_jax.cooc import keys as keys_lib
from dynamo_jax.errors import CheckpointError, InputError

FORMAT_NAME = "dynamo_jax.cooc"
FORMAT_VERSION = 1


@dataclasses.dataclass(eq=False)
class CoocTable:
  """Counts of contiguous n-grams of orders 1..max_order over a corpus.

  Attributes:
    vocab_size: V; token ids are in [0, V) and keys are mixed-radix in V.
    max_order: the largest n counted.
    unigram_counts: int64 [V], complete (unpruned) token counts.
    keys: order m (2..max_order) -> uint64 [R_m], strictly increasing keys.
    counts: order m -> int64 [R_m], counts of those keys, >= min_count.
    positions: order m (1..max_order) -> number of m-gram positions counted,
      i.e. sum over documents of max(0, tokens - (m - 1)); positions[1] is
      the token count. p(m-gram) = count / positions[m].
    num_documents: documents counted.
    min_count: n-grams of order >= 2 with a smaller total count were dropped.
    vocab_hash: `vocab_hash` of the tokenizer, or None if unknown.
    corpus: free-form description of the data counted.
  """

  vocab_size: int
  max_order: int
  unigram_counts: np.ndarray
  keys: dict[int, np.ndarray]
  counts: dict[int, np.ndarray]
  positions: dict[int, int]
  num_documents: int = 0
  min_count: int = 1
  vocab_hash: str | None = None
  corpus: str = ""

  @property
  def total_tokens(self) -> int:
    return self.positions[1]

  @property
  def pruning(self) -> str:
    """The pruning rule, in words (also written to the file)."""
    if self.min_count <= 1:
      return "none: every n-gram counted is kept"
    return (f"n-grams of order 2..{self.max_order} with a total count below "
            f"{self.min_count} are dropped after counting; unigram counts "
            "are complete")

  def count(self, ngram) -> int:
    """The count of one n-gram (a sequence of ids); 0 if absent or pruned."""
    ids = [int(x) for x in ngram]
    if not 1 <= len(ids) <= self.max_order:
      raise InputError(f"this table counts orders 1..{self.max_order}, not "
                       f"{len(ids)}.")
    if any(not 0 <= x < self.vocab_size for x in ids):
      return 0
    if len(ids) == 1:
      return int(self.unigram_counts[ids[0]])
    key = keys_lib.encode(np.asarray([ids]), self.vocab_size)[0]
    keys = self.keys[len(ids)]
    i = int(np.searchsorted(keys, key))
    found = i < keys.size and keys[i] == key
    return int(self.counts[len(ids)][i]) if found else 0

  def check_compatible(self, **kwargs) -> None:
    """`check_compatible(self, **kwargs)`: vocab_hash, vocab_size,
    num_heads."""
    check_compatible(self, **kwargs)

  def metadata(self) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "vocab_size": self.vocab_size, "max_order": self.max_order,
        "positions": {str(m): int(p) for m, p in self.positions.items()},
        "num_documents": self.num_documents, "min_count": self.min_count,
        "pruning": self.pruning, "vocab_hash": self.vocab_hash,
        "corpus": self.corpus,
        "num_ngrams": {str(m): int(k.size) for m, k in self.keys.items()},
    }

  def save(self, path: str | os.PathLike) -> None:
    """Writes the table atomically: a temp file in the same directory, then
    os.replace, so readers see the old file or the whole new one."""
    path = os.path.abspath(os.fspath(path))
    arrays = {
        "metadata": np.frombuffer(json.dumps(self.metadata()).encode(),
                                  np.uint8),
        "unigram_counts": _compact(self.unigram_counts),
    }
    for m in range(2, self.max_order + 1):
      arrays[f"keys_{m}"] = np.asarray(self.keys[m], np.uint64)
      arrays[f"counts_{m}"] = _compact(self.counts[m])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def _compact(counts: np.ndarray) -> np.ndarray:
  counts = np.asarray(counts)
  if counts.size and counts.max() >= 2**32:
    return counts.astype(np.uint64)
  return counts.astype(np.uint32)


def load(path: str | os.PathLike) -> CoocTable:
  """Reads and validates a table written by `CoocTable.save`.

  Raises:
    CheckpointError: naming the problem (missing, corrupt, another format or
      version, inconsistent arrays).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"no co-occurrence table at {path}.")
  try:
    with np.load(path, allow_pickle=False) as npz:
      if "metadata" not in npz.files:
        raise CheckpointError(f"{path} is not a co-occurrence table (no "
                              "metadata array); build one with `python -m "
                              "dynamo_jax cooc`.")
      meta = json.loads(npz["metadata"].tobytes().decode("utf-8"))
      _check_header(path, meta)
      max_order = int(meta["max_order"])
      arrays = {"unigram_counts": npz["unigram_counts"]}
      for m in range(2, max_order + 1):
        arrays[f"keys_{m}"] = npz[f"keys_{m}"]
        arrays[f"counts_{m}"] = npz[f"counts_{m}"]
  except CheckpointError:
    raise
  except (OSError, ValueError, KeyError, TypeError, EOFError,
          zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise CheckpointError(f"corrupt co-occurrence table {path}: "
                          f"{type(e).__name__}: {e}") from None
  return _build(path, meta, arrays)


def _check_header(path: str, meta: Any) -> None:
  fmt = meta.get("format") if isinstance(meta, dict) else None
  if fmt != FORMAT_NAME:
    raise CheckpointError(f"{path} is not a dynamo_jax co-occurrence table "
                          f"(format {fmt!r}).")
  if meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{path} is co-occurrence table format version "
        f"{meta.get('version')!r}; this dynamo_jax reads version "
        f"{FORMAT_VERSION}. Rebuild it with `python -m dynamo_jax cooc`.")


def _build(path: str, meta: dict, arrays: dict) -> CoocTable:
  """The table from its parts, after checking that they agree."""

  def bad(msg):
    return CheckpointError(f"corrupt co-occurrence table {path}: {msg}.")

  try:
    vocab_size, max_order = int(meta["vocab_size"]), int(meta["max_order"])
    positions = {int(m): int(p) for m, p in meta["positions"].items()}
    min_count = int(meta["min_count"])
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise bad(f"bad metadata ({type(e).__name__}: {e})") from None
  keys_lib.check_fits(vocab_size, max_order)
  if sorted(positions) != list(range(1, max_order + 1)):
    raise bad(f"positions cover orders {sorted(positions)}, expected "
              f"1..{max_order}")
  unigrams = arrays["unigram_counts"]
  if unigrams.shape != (vocab_size,) or unigrams.dtype.kind != "u":
    raise bad(f"unigram_counts is {unigrams.dtype} {unigrams.shape}, "
              f"expected unsigned ({vocab_size},)")
  if int(unigrams.sum(dtype=np.uint64)) != positions[1]:
    raise bad("unigram counts do not add up to the token count")
  keys, counts = {}, {}
  for m in range(2, max_order + 1):
    k, c = arrays[f"keys_{m}"], arrays[f"counts_{m}"]
    if k.dtype != np.uint64 or k.ndim != 1 or c.shape != k.shape or \
        c.dtype.kind != "u":
      raise bad(f"order {m}: keys {k.dtype} {k.shape} and counts {c.dtype} "
                f"{c.shape} do not form a table")
    if k.size and (np.any(k[1:] <= k[:-1]) or
                   int(k[-1]) >= vocab_size**m):
      raise bad(f"order {m}: keys are not strictly increasing below V**{m}")
    if c.size and (c.min() < min_count or int(c.max()) >= 2**63):
      raise bad(f"order {m}: a count is outside [{min_count}, 2**63)")
    keys[m], counts[m] = k, c.astype(np.int64)
  return CoocTable(
      vocab_size=vocab_size, max_order=max_order,
      unigram_counts=unigrams.astype(np.int64), keys=keys, counts=counts,
      positions=positions, num_documents=int(meta.get("num_documents", 0)),
      min_count=min_count, vocab_hash=meta.get("vocab_hash"),
      corpus=str(meta.get("corpus", "")))


def vocab_hash(tokenizer_or_vocab: Any) -> str:
  """A deterministic hash of a vocabulary: "sha256:<hex>".

  Accepts a mapping token -> id or an object with `get_vocab()` (HF
  tokenizers, `tokenizers.Tokenizer`). The hash covers every (id, token)
  pair, sorted by id, so it changes when any token or id does.
  """
  vocab = tokenizer_or_vocab
  if hasattr(vocab, "get_vocab"):
    vocab = vocab.get_vocab()
  if not isinstance(vocab, Mapping):
    raise InputError("vocab_hash needs a dict token -> id or a tokenizer "
                     "with get_vocab(), got "
                     f"{type(tokenizer_or_vocab).__name__}.")
  pairs = []
  for token, i in vocab.items():
    token = token.hex() if isinstance(token, bytes) else str(token)
    pairs.append((int(i), token))
  blob = json.dumps(sorted(pairs), ensure_ascii=False, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_compatible(table: CoocTable, *, vocab_hash: str | None = None,
                     vocab_size: int | None = None,
                     num_heads: int | None = None) -> None:
  """Raises CheckpointError if `table` cannot serve a model.

  Args:
    table: the co-occurrence table.
    vocab_hash: the model tokenizer's `vocab_hash`; must equal the table's.
    vocab_size: the model's vocabulary size (embedding rows, often padded
      beyond the tokenizer's); must be >= the table's, so that every table
      id is a model id. Model ids beyond the table's get weight 0.
    num_heads: n, the DynaMo token heads of the model (T3: 3); the table
      must hold n-gram orders up to n.
  """
  if vocab_hash is not None and table.vocab_hash != vocab_hash:
    if table.vocab_hash is None:
      raise CheckpointError(
          "the co-occurrence table records no vocabulary hash (it was counted "
          "from token ids without --tokenizer), so it cannot be checked "
          "against the model's tokenizer; rebuild it with --tokenizer.")
    raise CheckpointError(
        f"the co-occurrence table was counted with another vocabulary "
        f"(table {table.vocab_hash}, model tokenizer {vocab_hash}); rebuild "
        "it with the model's tokenizer.")
  if vocab_size is not None and table.vocab_size > vocab_size:
    raise CheckpointError(
        f"the co-occurrence table's vocabulary ({table.vocab_size} ids) is "
        f"larger than the model's ({vocab_size}); it was counted for another "
        "model.")
  if num_heads is not None and table.max_order < num_heads:
    raise CheckpointError(
        f"a model with {num_heads} token heads needs n-gram orders up to "
        f"{num_heads}, but the co-occurrence table stops at order "
        f"{table.max_order}; rebuild it with --max-order {num_heads}.")
