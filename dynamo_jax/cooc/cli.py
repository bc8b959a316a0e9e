"""`python -m dynamo_jax cooc`: count n-grams of a corpus into a table file.

Wire-up: `add_parser(subparsers)` registers the subcommand with `run` as its
`func`; `run(args)` raises DynamoError subclasses on bad input.

With --distributed (one process per host, as `train`), every process reads
the data and counts every P-th document (documents numbered across the
files in order; text files tokenize only their own); each writes its
unpruned counts beside --out (the folder must be shared by every process),
and process 0 merges them, prunes, writes --out and removes them. The
table equals one process's count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import types

import tqdm

from dynamo_jax import distributed
from dynamo_jax.cooc import count, sources
from dynamo_jax.cooc.table import CoocTable, vocab_hash
from dynamo_jax.errors import DynamoError, InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `cooc` on an argparse subparsers object; returns its parser."""
  p = subparsers.add_parser(
      "cooc", help="count n-gram co-occurrence statistics for DynaMo",
      description=__doc__.splitlines()[0])
  p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                 help="token-id files (.npy, .bin) or text files (.txt: one "
                 "document per line; .jsonl: one per line, see --text-key)")
  p.add_argument("--out", required=True, help="table file to write (.npz)")
  p.add_argument("--tokenizer", metavar="DIR",
                 help="directory with tokenizer.json: encodes text files and "
                 "records the vocabulary hash (recommended for id files too)")
  p.add_argument("--vocab-size", type=int,
                 help="vocabulary size of token-id files (default: the "
                 "tokenizer's); may exceed it, e.g. a padded model's")
  p.add_argument("--max-order", type=int, default=3,
                 help="largest n-gram order; a Tn model needs n (default 3)")
  p.add_argument("--min-count", type=int, default=1,
                 help="drop n-grams (order >= 2) with a total count below "
                 "this, after counting (default 1: keep all)")
  p.add_argument("--bin-dtype", default="uint16", choices=["uint16", "uint32"],
                 help="id type of .bin files (default uint16)")
  p.add_argument("--doc-sep", type=int, metavar="ID",
                 help="in token-id files, this id ends a document (e.g. 0, "
                 "Pythia's <|endoftext|>); default: one document per file")
  p.add_argument("--text-key", default="text",
                 help="field of .jsonl records holding the text")
  p.add_argument("--corpus", help="description stored in the table "
                 "(default: the data file names)")
  p.add_argument("--memory-gb", type=float, default=1.0,
                 help="memory budget of the partial counts; beyond it they "
                 "spill to disk (peak is about twice this + 0.5; default 1)")
  p.add_argument("--spill-dir", help="directory for spilled counts "
                 "(default: the system temp dir)")
  p.add_argument("--force", action="store_true",
                 help="overwrite --out if it exists")
  distributed.add_arguments(p)
  p.set_defaults(func=run)
  return p


def _load_tokenizer(directory: str):
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise InputError(f"--tokenizer {directory} has no tokenizer.json.")
  import tokenizers  # pylint: disable=import-outside-toplevel
  return tokenizers.Tokenizer.from_file(path)


def _vocab_size(args, tokenizer) -> int:
  if tokenizer is None:
    if args.vocab_size is None:
      raise InputError("give --vocab-size (or --tokenizer) for token-id "
                       "files.")
    return args.vocab_size
  size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
  if args.vocab_size is not None and args.vocab_size < size:
    raise InputError(f"--vocab-size {args.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({size} ids).")
  return args.vocab_size or size


class _Shard:
  """Which documents this process counts: document d (numbered across the
  files in order) belongs to process d % count."""

  def __init__(self, count_: int, index: int):
    self.count, self.index, self.document = count_, index, 0

  def mine(self) -> bool:
    return self.document % self.count == self.index


class _ShardTokenizer:
  """A tokenizer for `sources.read_text` that encodes only the shard's
  documents (read_text yields one document per text it encodes, in order);
  the others come back empty and are skipped, so no process tokenizes
  another's text."""

  _EMPTY = types.SimpleNamespace(ids=[])

  def __init__(self, tokenizer, shard: _Shard):
    self._tokenizer, self._shard = tokenizer, shard
    self._next = 0  # the document number of the next text

  def start_file(self) -> None:
    self._next = self._shard.document

  def encode_batch(self, texts, **kwargs):
    numbers = range(self._next, self._next + len(texts))
    self._next += len(texts)
    mine = [i for i, d in enumerate(numbers)
            if d % self._shard.count == self._shard.index]
    out = [self._EMPTY] * len(texts)
    if mine:
      encoded = self._tokenizer.encode_batch([texts[i] for i in mine],
                                             **kwargs)
      for i, enc in zip(mine, encoded):
        out[i] = enc
    return out


def _count(args, tokenizer, vocab_size, corpus, shard, min_count):
  """This process's table of its documents, pruned to `min_count`."""
  total = sum(sources.progress_bytes(p, args.bin_dtype) for p in args.data)
  if total == 0:
    raise InputError(f"no tokens in {', '.join(args.data)}: the data is empty, "
                     "so there is nothing to count; nothing was written.")
  bar = tqdm.tqdm(total=total, unit="B", unit_scale=True,
                  desc="counting n-grams", smoothing=0.1,
                  disable=shard.index != 0)
  text_tokenizer = tokenizer
  if tokenizer is not None and shard.count > 1:
    text_tokenizer = _ShardTokenizer(tokenizer, shard)
  try:
    with count.NgramCounter(
        vocab_size, args.max_order,
        memory_budget_bytes=int(args.memory_gb * 2**30),
        spill_dir=args.spill_dir) as counter:
      for path in args.data:
        if sources.is_text(path):
          if text_tokenizer is not tokenizer:
            text_tokenizer.start_file()
          pieces = sources.read_text(path, text_tokenizer,
                                     text_key=args.text_key,
                                     advance=bar.update)
        else:
          pieces = sources.read_tokens(path, bin_dtype=args.bin_dtype,
                                       doc_sep=args.doc_sep,
                                       advance=bar.update)
        # Readers end every file with end_of_document=True.
        for ids, end_of_document in pieces:
          if shard.mine():
            counter.add(ids, end_of_document=end_of_document)
          shard.document += end_of_document
      return counter.finish(
          min_count, corpus=corpus,
          vocab_hash=None if tokenizer is None else vocab_hash(tokenizer))
  finally:
    bar.close()


def run(args) -> CoocTable | None:
  """Counts the n-grams of args.data and writes the table to args.out (in a
  multi-process run, process 0 writes it and returns it; the others None)."""
  sources.check_paths(args.data)
  if args.min_count < 1:
    raise InputError(f"--min-count must be >= 1, got {args.min_count}.")
  if os.path.exists(args.out) and not args.force:
    raise InputError(f"{args.out} exists; pass --force to overwrite it.")
  text = [p for p in args.data if sources.is_text(p)]
  if text and not args.tokenizer:
    raise InputError(f"text file {text[0]} needs --tokenizer DIR.")
  tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
  vocab_size = _vocab_size(args, tokenizer)
  corpus = args.corpus or ", ".join(os.path.basename(p) for p in args.data)
  if distributed.initialize_from_args(args):
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      table = _run_distributed(args, tokenizer, vocab_size, corpus,
                               jax.process_count(), jax.process_index())
      return table
  table = _count(args, tokenizer, vocab_size, corpus, _Shard(1, 0),
                 args.min_count)
  _write(args, table)
  return table


def _write(args, table: CoocTable) -> None:
  if table.total_tokens == 0:
    raise InputError(f"no tokens in {', '.join(args.data)}: the data is empty, "
                     "so there is nothing to count; nothing was written.")
  table.save(args.out)
  sizes = ", ".join(f"{m}-grams {k.size}" for m, k in table.keys.items())
  print(f"wrote {args.out}: {table.total_tokens} tokens in "
        f"{table.num_documents} documents; {sizes}", file=sys.stderr)


def _run_distributed(args, tokenizer, vocab_size, corpus, processes,
                     index) -> CoocTable | None:
  """Counts this process's documents, writes them beside --out; process 0
  merges every process's, writes --out and removes the parts."""
  out = os.path.abspath(args.out)
  folder, name = os.path.split(out)
  os.makedirs(folder, exist_ok=True)
  distributed.check_shared_dir(folder)
  parts = os.path.join(folder, f".{name}.parts")
  if index == 0:  # a killed run's parts, then an empty folder for these
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
  distributed.barrier("cooc_parts_ready")
  table = None
  try:
    try:
      partial = _count(args, tokenizer, vocab_size, corpus,
                       _Shard(processes, index), 1)
      count.save_partial(partial, parts, index)
      del partial
    except (DynamoError, OSError):
      distributed.check_all_ok(False, "counting")
      raise
    distributed.check_all_ok(True, "counting")
    if index == 0:
      try:
        table = count.merge_partials(
            parts, processes, vocab_size, args.max_order, args.min_count,
            corpus=corpus,
            vocab_hash=None if tokenizer is None else vocab_hash(tokenizer))
        _write(args, table)
      except (DynamoError, OSError):
        distributed.check_all_ok(False, f"merging the counts into {args.out}")
        raise
    distributed.check_all_ok(True, f"merging the counts into {args.out}")
  finally:
    if index == 0:
      shutil.rmtree(parts, ignore_errors=True)
  return table
