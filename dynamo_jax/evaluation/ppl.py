"""`python -m dynamo_jax eval ppl`: the paper's multi-token perplexities of a
data file, PPL_1..PPL_n, PPL_1:2..PPL_1:n and the dynamic PPL_d
(definitions in `perplexity.py`).

Data files:
  .txt    one document (the whole file)
  .jsonl  one document per line, its text in a field (`--field`, "text")
  .npy    a 1-D integer array of token ids, documents separated by EOS
A document is scored as its tokens followed by EOS, as in training. Token
ids outside the model's vocabulary (a file made with another tokenizer) and
files with nothing to score are refused.

With --distributed (one process per host, as `train`), every process reads
the file, scores every P-th batch of windows, and receives the others'
scores; process 0 prints the result, which equals one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from dynamo_jax import distributed
from dynamo_jax.cooc.sources import token_array
from dynamo_jax.errors import InputError

SUFFIXES = (".txt", ".jsonl", ".npy")


def _texts(path: str, field: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as fh:
      if path.endswith(".txt"):
        return [fh.read()]
      texts = []
      for i, line in enumerate(fh, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError:
          raise InputError(f"{path} line {i} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get(field),
                                                          str):
          raise InputError(f"{path} line {i} has no text field {field!r} "
                           "(choose the field with --field).")
        texts.append(record[field])
      return texts
  except UnicodeDecodeError:
    raise InputError(f"{path} is not UTF-8 text.") from None


def read_stream(path: str, tokenizer, *, eos_id: int, vocab_size: int,
                field: str = "text") -> np.ndarray:
  """int32 [T]: the file's documents as one EOS-separated token stream, each
  document followed by EOS."""
  if not os.path.isfile(path):
    raise InputError(f"data file {path} does not exist.")
  if not path.endswith(SUFFIXES):
    raise InputError(f"{path}: unknown data file type; expected one of "
                     f"{', '.join(SUFFIXES)}.")
  if path.endswith(".npy"):
    ids = token_array(path)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise InputError(
          f"{path} holds token ids in [{int(ids.min())}, {int(ids.max())}], "
          f"outside this model's vocabulary of {vocab_size}: it was made with "
          "another tokenizer; re-tokenize the text with this model's.")
    stream = ids.astype(np.int32)
    if stream.size and stream[-1] != eos_id:
      stream = np.append(stream, np.int32(eos_id))
  else:
    pieces = []
    for text in _texts(path, field):
      if text.strip():
        pieces += [np.asarray(tokenizer.encode(text), np.int32),
                   np.asarray([eos_id], np.int32)]
    stream = (np.concatenate(pieces) if pieces
              else np.zeros((0,), np.int32))
  if stream.size < 2:
    raise InputError(f"{path} has no text to score (empty, or documents of "
                     "fewer than 2 tokens).")
  return stream


def evaluate_file(model, path: str, *, window: int = 256,
                  stride: int | None = None, eps_b: float = 0.5,
                  field: str = "text", batch_size: int = 8,
                  temperature: float = 0.7, use_cooc: bool = True,
                  progress: bool = True) -> dict:
  """The `eval ppl` result for a loaded `dynamo_jax.Model` and a data file:
  {"ppl_1", ..., "ppl_n", "ppl_1:2", ..., "ppl_1:n", "ppl_d",
   "tokens_per_pass_d", "eps_b", "tokens_scored", "documents", "window"}."""
  # pylint: disable-next=import-outside-toplevel
  from dynamo_jax.evaluation import perplexity
  config = model.config
  if not 0.0 <= eps_b <= 1.0:
    raise InputError(f"--eps-b must lie in [0, 1], got {eps_b}.")
  if window < 2 or window > config.max_position_embeddings:
    raise InputError(f"--window must lie in 2..{config.max_position_embeddings}"
                     f" (the model's context), got {window}.")
  stream = read_stream(path, model.tokenizer, eos_id=config.eos_token_id,
                       vocab_size=config.vocab_size, field=field)
  cooc = model.cooc if use_cooc else None
  result = perplexity.evaluate_dynamic(
      config, model.params, stream, eos_id=config.eos_token_id,
      window=window, stride=stride, batch_size=batch_size, eps_b=eps_b,
      cooc=cooc, temperature=temperature, progress=progress)
  result["window"] = window
  return result


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "ppl", help="multi-token perplexities PPL_n, PPL_1:n and the dynamic "
      "PPL_d of a .txt / .jsonl / .npy file",
      description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--model", help="checkpoint directory or hub id (default: "
                 "the embedded DynaMo-T3)")
  p.add_argument("--data", required=True, help=".txt (one document), .jsonl "
                 "(one per line) or .npy (EOS-separated token ids)")
  p.add_argument("--field", default="text", help="text field of .jsonl "
                 "records (default text)")
  p.add_argument("--window", type=int, default=256,
                 help="tokens of context per window (default 256)")
  p.add_argument("--stride", type=int, help="window stride (default: the "
                 "window: non-overlapping)")
  p.add_argument("--eps-b", type=float, default=0.5,
                 help="back-off threshold of PPL_d (default 0.5)")
  p.add_argument("--temperature", type=float, default=0.7,
                 help="the sampler's temperature in PPL_d's back-off")
  p.add_argument("--no-cooc", action="store_true",
                 help="PPL_d's back-off without the co-occurrence table")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--json", action="store_true",
                 help="print one JSON object instead of a table")
  distributed.add_arguments(p)
  p.set_defaults(func=run)
  return p


def run(args) -> dict:
  from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}.")
  if not os.path.isfile(args.data):  # before the model loads
    raise InputError(f"data file {args.data} does not exist.")
  distributed.initialize_from_args(args)  # before anything touches a device
  model = load(args.model)
  result = evaluate_file(model, args.data, window=args.window,
                         stride=args.stride, eps_b=args.eps_b,
                         field=args.field, batch_size=args.batch_size,
                         temperature=args.temperature,
                         use_cooc=not args.no_cooc, progress=not args.json)
  if jax.process_index() != 0:
    return result
  if args.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      shown = f"{value:.3f}" if isinstance(value, float) else value
      print(f"{key:>18}  {shown}")
  sys.stdout.flush()
  return result
