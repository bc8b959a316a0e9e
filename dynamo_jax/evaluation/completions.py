"""`python -m dynamo_jax eval completions`: the paper's open-ended benchmark.

Prompts (default the paper's 10) x seeds x the eps_b grid (default the
paper's 0.00, 0.02, ..., 1.00) in mode "dynamo", with the model's
co-occurrence table when it ships one; AR and verified decoding (unless
switched off) at the same seeds as baselines. Sampling at `temperature`;
k, alpha and the repetition penalty are `generate`'s defaults.

OUT/generations.jsonl holds one JSON object per generation with exactly the
fields FIELDS; eps_b is null unless mode is "dynamo", text and token_ids are
the continuation only, forward_passes counts the prefill, model is the
--model argument (null: the embedded default). Row seed s is
generate(..., seed=[s]) (key PRNGKey(s)): its tokens do not depend on the
batch it was decoded in.

"seconds" is the wall-clock of the `generate` call that made the row,
compile excluded (each new program shape runs once untimed first). By
default each generation is its own batch-1 call: the honest time of one
generation. With batch_seeds the seeds of one (prompt, mode, eps_b) share
one call and each row gets its seconds / batch (same tokens, not a latency).

Re-running resumes: rows already written (key prompt_id, seed, mode, eps_b)
are skipped. OUT/run.json records what a row's content depends on (model,
prompts, max_new_tokens, temperature, batch_seeds, table, generate's
defaults) and other values are refused; seeds, grid and verified only
choose rows, so they may grow between runs. Each row is appended with
flush + fsync; a partial last line left by a kill is cut on the next start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from dynamo_jax.errors import InputError
# SETTINGS_FILE and parse_eps_b_grid are part of this module's interface too.
from dynamo_jax.evaluation.rundir import (SETTINGS_FILE, append_row,
                                          check_grid, check_seeds,
                                          check_settings, generation_settings,
                                          lock_dir, parse_eps_b_grid,
                                          read_rows, row_counts,
                                          sampling_kwargs, timed_generate)

PAPER_PROMPTS = (
    "I am a student at the", "This is going to be a very",
    "He wanted to play, but", "How can we", "What will", "Will you",
    "Please explain", "Do not", "Wow! I can't believe that",
    "This is amazing! We")
PAPER_EPS_B_GRID = tuple(round(0.02 * i, 2) for i in range(51))
FIELDS = ("prompt_id", "prompt", "seed", "mode", "eps_b", "text", "prompt_ids",
          "token_ids", "forward_passes", "tokens_per_pass", "seconds", "model")
ROWS_FILE = "generations.jsonl"


def read_prompts(path: str) -> list[str]:
  """The prompts of a .txt file (one per line; blank lines skipped, line
  ends stripped, other spaces kept) or a .jsonl file (a "prompt" string per
  object)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".jsonl"):
    raise InputError(f"prompts file {path} must be .txt (one prompt per line) "
                     "or .jsonl (one {\"prompt\": ...} object per line).")
  try:
    with open(path, encoding="utf-8") as fh:  # universal newlines
      lines = fh.read().split("\n")
  except FileNotFoundError:
    raise InputError(f"prompts file {path} does not exist.") from None
  except UnicodeDecodeError:
    raise InputError(f"prompts file {path} is not UTF-8 text (convert it, "
                     "e.g. with iconv -t UTF-8).") from None
  except OSError as e:
    raise InputError(f"cannot read prompts file {path}: "
                     f"{e.strerror or e}.") from None
  prompts = [line for line in lines if line.strip()]
  if ext == ".jsonl":
    prompts = [_jsonl_prompt(line, n, path)
               for n, line in enumerate(lines, 1) if line.strip()]
  if not prompts:
    raise InputError(f"prompts file {path} holds no prompts.")
  return prompts


def _jsonl_prompt(line: str, number: int, path: str) -> str:
  try:
    record = json.loads(line)
  except ValueError:
    raise InputError(f"{path} line {number} is not JSON; a .jsonl prompts "
                     "file holds one {\"prompt\": ...} object per line.") from None
  if not isinstance(record, dict) or not (
      isinstance(record.get("prompt"), str) and record["prompt"].strip()):
    raise InputError(f"{path} line {number} has no non-empty \"prompt\" "
                     "string.")
  return record["prompt"]


def _encode(model, prompts, max_new_tokens) -> list[list[int]]:
  """Token ids per prompt, checked to fit the model's positions."""
  config = model.config
  if config.num_token_heads < 2:
    raise InputError(
        "completions compares DynaMo decoding with AR, and mode 'dynamo' "
        "needs a DynaMo model with token heads (num_token_heads n >= 2); this "
        "model has only head 1. Add and train heads (python -m dynamo_jax "
        "train), or use a DynaMo checkpoint.")
  if model.tokenizer is None:
    raise InputError("the model has no tokenizer; completions encodes and "
                     "decodes text.")
  encoded = []
  for i, prompt in enumerate(prompts):
    ids = [int(t) for t in model.tokenizer.encode(prompt)]
    if not ids:
      raise InputError(f"prompt {i} ({prompt!r}) encodes to no tokens.")
    # generate's bound: the last chunk fed starts at P + G - 1 at most.
    if len(ids) + max_new_tokens + config.num_token_heads - 2 >= (
        config.max_position_embeddings):
      raise InputError(
          f"prompt {i} has {len(ids)} tokens; with max_new_tokens "
          f"{max_new_tokens} it exceeds the model's "
          f"{config.max_position_embeddings} positions. Shorten it or ask "
          "for fewer tokens.")
    encoded.append(ids)
  return encoded


def _settings(model, model_name, prompts, max_new_tokens, temperature,
              batch_seeds) -> dict:
  settings = generation_settings(model, model_name, max_new_tokens,
                                 temperature, batch_seeds)
  return {"model": settings.pop("model"),
          "model_config": settings.pop("model_config"),
          "prompts": list(prompts), **settings}


def _key(prompt_id, seed, mode, eps_b):
  return (prompt_id, seed, mode, None if eps_b is None else float(eps_b))


def plan(num_prompts: int, seeds, eps_b_grid, verified: bool) -> list[tuple]:
  """Row keys (prompt_id, seed, mode, eps_b) in the order they are made:
  AR, then verified, then DynaMo at each eps_b; prompts, then seeds."""
  settings = [("ar", None)] + ([("verified", None)] if verified else [])
  settings += [("dynamo", float(e)) for e in eps_b_grid]
  return [_key(p, s, mode, eps) for mode, eps in settings
          for p in range(num_prompts) for s in seeds]


def _calls(todo: list[tuple], batch_seeds: bool):
  """Groups the keys to make into generate calls: (prompt_id, mode, eps_b,
  seeds), consecutive seeds of one setting together when batch_seeds."""
  calls = []
  for p, s, mode, eps in todo:
    if batch_seeds and calls and calls[-1][:3] == (p, mode, eps):
      calls[-1][3].append(s)
    else:
      calls.append((p, mode, eps, [s]))
  return calls


def run_completions(model=None, prompts: Sequence[str] | None = None, *,
                    out_dir: str, seeds=10, eps_b_grid=PAPER_EPS_B_GRID,
                    max_new_tokens: int = 64, temperature: float = 0.7,
                    verified: bool = True, batch_seeds: bool = False,
                    model_name: str | None = None,
                    progress: bool = True) -> str:
  """Makes the rows missing from `out_dir` (module docstring); returns the
  path of its generations.jsonl. model: a checkpoint path or hub id (the
  rows' "model"), None (the embedded model), or a loaded `dynamo_jax.Model`
  (the rows' "model" is then `model_name`). seeds: a count S (0..S-1) or
  ints; prompts: texts (default the paper's 10)."""
  prompts = list(PAPER_PROMPTS if prompts is None else prompts)
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise InputError("prompts must be a non-empty list of non-empty strings.")
  seeds, eps_b_grid = check_seeds(seeds), check_grid(eps_b_grid)
  if type(max_new_tokens) is not int or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive integer, got "
                     f"{max_new_tokens!r}.")
  if not isinstance(temperature, (int, float)) or not (
      0 < temperature < float("inf")):
    raise InputError(f"temperature must be > 0 and finite (the benchmark "
                     f"samples), got {temperature!r}.")
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise InputError(f"--out {out_dir} is a file; give a directory (new, or "
                     "one made by an earlier completions run to resume).")
  if model is None or isinstance(model, (str, os.PathLike)):
    from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
    model_name = None if model is None else os.fspath(model)
    model = load(model_name)
  encoded = _encode(model, prompts, max_new_tokens)
  settings = _settings(model, model_name, prompts, max_new_tokens,
                       float(temperature), bool(batch_seeds))
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot create {out_dir}: {e.strerror or e}.") from None
  lock = lock_dir(out_dir)
  try:
    check_settings(out_dir, settings)
    path = os.path.join(out_dir, ROWS_FILE)
    done = read_rows(path, FIELDS, lambda r: _key(
        r["prompt_id"], r["seed"], r["mode"], r["eps_b"]))
    wanted = plan(len(prompts), seeds, eps_b_grid, verified)
    todo = [k for k in wanted if k not in done]
    _make_rows(model, prompts, encoded, _calls(todo, batch_seeds), path,
               settings, len(wanted), progress)
  finally:
    os.close(lock)
  return path


def _make_rows(model, prompts, encoded, calls, path, settings, total,
               progress):
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=total - sum(len(c[3]) for c in calls),
             desc="completions", unit="gen", disable=not progress)
  compiled = set()
  with open(path, "ab") as fh, bar:
    for p, mode, eps, seeds in calls:
      bar.set_postfix_str(mode if eps is None else f"{mode} eps_b={eps:g}")
      ids = np.asarray([encoded[p]] * len(seeds), np.int32)
      out, seconds = timed_generate(
          model, ids, compiled,
          **sampling_kwargs(model, mode, eps, settings, seeds))
      for b, seed in enumerate(seeds):
        tokens, passes, tokens_per_pass = row_counts(out, b)
        append_row(fh, dict(
            prompt_id=p, prompt=prompts[p], seed=seed, mode=mode, eps_b=eps,
            text=model.tokenizer.decode(tokens), prompt_ids=encoded[p],
            token_ids=tokens, forward_passes=passes,
            tokens_per_pass=tokens_per_pass, seconds=seconds,
            model=settings["model"]))
        bar.update(1)


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "completions", help="the paper's open-ended benchmark: prompts x seeds "
      "x eps_b grid, DynaMo vs AR and verified, one JSON line per generation",
      description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--model", help="checkpoint directory or hub id (default: "
                 "the embedded DynaMo-T3)")
  p.add_argument("--prompts", metavar="FILE", help=".txt (one prompt per "
                 "line) or .jsonl (\"prompt\" field); default: the paper's 10")
  p.add_argument("--seeds", type=int, default=10,
                 help="seeds 0..S-1 per prompt and setting (default 10)")
  p.add_argument("--eps-b-grid", metavar="E1,E2,...", help="eps_b values in "
                 "[0, 1], comma-separated (default: the paper's 0, 0.02, ..., 1)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--no-verified", action="store_true",
                 help="skip the verified-decoding rows")
  p.add_argument("--batch-seeds", action="store_true",
                 help="decode the seeds of a setting in one call (faster; "
                 "'seconds' becomes the call's time / batch)")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="output directory; re-running resumes")
  p.set_defaults(func=run)
  return p


def run(args) -> str:
  path = run_completions(
      args.model, read_prompts(args.prompts) if args.prompts else None,
      out_dir=args.out, seeds=args.seeds, eps_b_grid=PAPER_EPS_B_GRID
      if args.eps_b_grid is None else parse_eps_b_grid(args.eps_b_grid),
      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      verified=not args.no_verified, batch_seeds=args.batch_seeds)
  print(f"wrote {path}", file=sys.stderr)
  return path
