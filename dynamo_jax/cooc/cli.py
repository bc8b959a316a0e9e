"""`python -m dynamo_jax cooc`: count n-grams of a corpus into a table file.

Wire-up: `add_parser(subparsers)` registers the subcommand with `run` as its
`func`; `run(args)` raises DynamoError subclasses on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

import tqdm

from dynamo_jax.cooc import count, sources
from dynamo_jax.cooc.table import CoocTable, vocab_hash
from dynamo_jax.errors import InputError


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


def run(args) -> CoocTable:
  """Counts the n-grams of args.data and writes the table to args.out."""
  sources.check_paths(args.data)
  if os.path.exists(args.out) and not args.force:
    raise InputError(f"{args.out} exists; pass --force to overwrite it.")
  text = [p for p in args.data if sources.is_text(p)]
  if text and not args.tokenizer:
    raise InputError(f"text file {text[0]} needs --tokenizer DIR.")
  tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
  vocab_size = _vocab_size(args, tokenizer)
  corpus = args.corpus or ", ".join(os.path.basename(p) for p in args.data)
  total = sum(sources.progress_bytes(p, args.bin_dtype) for p in args.data)
  if total == 0:
    raise InputError(f"no tokens in {', '.join(args.data)}: the data is empty, "
                     "so there is nothing to count; nothing was written.")
  bar = tqdm.tqdm(total=total, unit="B", unit_scale=True,
                  desc="counting n-grams", smoothing=0.1)
  try:
    with count.NgramCounter(
        vocab_size, args.max_order,
        memory_budget_bytes=int(args.memory_gb * 2**30),
        spill_dir=args.spill_dir) as counter:
      for path in args.data:
        if sources.is_text(path):
          pieces = sources.read_text(path, tokenizer, text_key=args.text_key,
                                     advance=bar.update)
        else:
          pieces = sources.read_tokens(path, bin_dtype=args.bin_dtype,
                                       doc_sep=args.doc_sep,
                                       advance=bar.update)
        # Readers end every file with end_of_document=True.
        for ids, end_of_document in pieces:
          counter.add(ids, end_of_document=end_of_document)
      table = counter.finish(
          args.min_count, corpus=corpus,
          vocab_hash=None if tokenizer is None else vocab_hash(tokenizer))
  finally:
    bar.close()
  if table.total_tokens == 0:
    raise InputError(f"no tokens in {', '.join(args.data)}: the data is empty, "
                     "so there is nothing to count; nothing was written.")
  table.save(args.out)
  sizes = ", ".join(f"{m}-grams {k.size}" for m, k in table.keys.items())
  print(f"wrote {args.out}: {table.total_tokens} tokens in "
        f"{table.num_documents} documents; {sizes}", file=sys.stderr)
  return table
