"""`python -m dynamo_jax eval chat`: the paper's chat evaluation.

Vicuna / MT-Bench questions (default: the project's own 25, in the embedded
model's Early Modern English; any question.jsonl with --questions) answered
through the model's chat template (its tokenizer's, else dynamo_jax's
default, said on stderr) by AR, verified decoding and DynaMo at each eps_b
of the grid (default 1, 0.75, 0.5, 0.25, 0), at each seed, multi-turn
questions turn by turn (chat_answers.py). With a judge (--judge-url,
--judge-model: any OpenAI-compatible server) every conversation is judged
pairwise against the model's own AR conversation at the same question and
seed, and the report gives win rate against speed-up, per category
(chat_report.py). The judge is probed before anything is generated; a
judge that cannot be reached, or refuses the key, is an error.

OUT: run.json and answers.jsonl (resumable: a re-run makes only the missing
answers, and other settings are refused), judge_cache/ (verdicts; a re-run
never asks twice), conversations.jsonl, table.json, table.md, table.csv,
winrate_vs_speedup.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from dynamo_jax.errors import InputError

DEFAULT_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)


def _model(model, model_name):
  """(loaded model, its name for the rows), refusing a model without token
  heads or a tokenizer."""
  if model is None or isinstance(model, (str, os.PathLike)):
    from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
    model_name = None if model is None else os.fspath(model)
    model = load(model_name)
  if model.config.num_token_heads < 2:
    raise InputError(
        "eval chat compares DynaMo decoding with AR, and mode 'dynamo' needs "
        "a DynaMo model with token heads (num_token_heads n >= 2); this model "
        "has only head 1. Add and train heads (python -m dynamo_jax train), "
        "or use a DynaMo checkpoint.")
  if model.tokenizer is None:
    raise InputError("the model has no tokenizer; eval chat renders "
                     "conversations as text.")
  return model, model_name


def run_chat(model=None, questions=None, *, out_dir: str, seeds=1,
             eps_b_grid=DEFAULT_GRID, verified: bool = True,
             max_new_tokens: int = 128, temperature: float = 0.7,
             pad_multiple: int = 32, judge=None, workers: int = 4,
             bootstrap: int = 1000, bootstrap_seed: int = 0,
             model_name: str | None = None, progress: bool = True) -> dict:
  """Answers, judges and reports (module docstring); returns table.json's
  content. model: a checkpoint path or hub id, None (the embedded model) or
  a loaded `dynamo_jax.Model` (named `model_name` in the rows); questions:
  chat_answers.read_questions's records (default the project's own);
  judge: a PairwiseJudge or None (speed-ups only)."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.chat.template import chat_template, default_note
  from dynamo_jax.evaluation import chat_answers, chat_report, rundir
  if questions is None:
    questions = chat_answers.read_questions(
        chat_answers.default_questions_path())
  seeds, grid = rundir.check_seeds(seeds), rundir.check_grid(eps_b_grid)
  if type(max_new_tokens) is not int or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive integer, got "
                     f"{max_new_tokens!r}.")
  if not isinstance(temperature, (int, float)) or not (
      0 < temperature < float("inf")):
    raise InputError(f"temperature must be > 0 and finite (the evaluation "
                     f"samples), got {temperature!r}.")
  if type(pad_multiple) is not int or pad_multiple < 1:
    raise InputError(f"pad_multiple must be a positive integer (1: no "
                     f"padding), got {pad_multiple!r}.")
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise InputError(f"--out {out_dir} is a file; give a directory (new, or "
                     "one made by an earlier eval chat run to resume).")
  if judge is not None:
    judge.probe()
  model, model_name = _model(model, model_name)
  template, source = chat_template(model.tokenizer)
  note = default_note(source)
  if note:
    print(note, file=sys.stderr)
  chat_answers.check_first_turns(model, questions, template, max_new_tokens)
  settings = rundir.generation_settings(model, model_name, max_new_tokens,
                                        float(temperature), False)
  settings |= {"questions": questions, "chat_template": template,
               "chat_template_source": source, "pad_multiple": pad_multiple}
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot create {out_dir}: {e.strerror or e}.") from None
  lock = rundir.lock_dir(out_dir, "eval chat")
  try:
    rundir.check_settings(out_dir, settings, "eval chat")
    rows = chat_answers.make_answers(
        model, questions, chat_answers.settings_plan(grid, verified), seeds,
        out_dir=out_dir, settings=settings, template=template,
        pad_multiple=pad_multiple, progress=progress)
    return chat_report.report(
        rows, questions, out_dir=out_dir, judge=judge, workers=workers,
        bootstrap=bootstrap, seed=bootstrap_seed,
        info={"model": model_name, "answers": os.path.join(
            out_dir, chat_answers.ANSWERS_FILE),
              "eps_b_grid": grid, "verified": verified,
              "max_new_tokens": max_new_tokens, "temperature": temperature})
  finally:
    os.close(lock)


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `chat` (under `eval`)."""
  from dynamo_jax.evaluation.judge import add_judge_arguments  # pylint: disable=import-outside-toplevel
  p = subparsers.add_parser(
      "chat", help="the paper's chat evaluation: Vicuna/MT-Bench questions "
      "through the chat template, DynaMo at each eps_b and verified judged "
      "against AR; win rate against speed-up per category",
      description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--model", help="checkpoint directory or hub id (default: "
                 "the embedded DynaMo-T3)")
  p.add_argument("--questions", metavar="FILE", help="question.jsonl "
                 "(question_id, category, turns per line; MT-Bench's and "
                 "Vicuna's format); default: the project's 25")
  p.add_argument("--seeds", type=int, default=1,
                 help="seeds 0..S-1 per question and setting (default 1)")
  p.add_argument("--eps-b-grid", metavar="E1,E2,...", help="eps_b values in "
                 "[0, 1], comma-separated (default 1,0.75,0.5,0.25,0)")
  p.add_argument("--no-verified", action="store_true",
                 help="skip verified decoding")
  p.add_argument("--max-new-tokens", type=int, default=128,
                 help="tokens generated per turn (default 128)")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--pad-multiple", type=int, default=32, metavar="M",
                 help="left-pad prompts with EOS to a multiple of M tokens, "
                 "one compile per multiple (default 32; 1: no padding)")
  add_judge_arguments(p, without="only the speed-ups are reported",
                      cache="OUT/judge_cache")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="output directory; re-running resumes")
  p.set_defaults(func=run)
  return p


def run(args) -> dict:
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.evaluation import chat_answers, chat_report, judge, rundir
  questions = (chat_answers.read_questions(args.questions)
               if args.questions else None)
  grid = (DEFAULT_GRID if args.eps_b_grid is None
          else rundir.parse_eps_b_grid(args.eps_b_grid))
  out = os.path.abspath(args.out)
  table = run_chat(
      args.model, questions, out_dir=out, seeds=args.seeds, eps_b_grid=grid,
      verified=not args.no_verified, max_new_tokens=args.max_new_tokens,
      temperature=args.temperature, pad_multiple=args.pad_multiple,
      judge=judge.judge_from_args(args, os.path.join(out, "judge_cache")),
      workers=args.workers, bootstrap=args.bootstrap,
      bootstrap_seed=args.seed)
  print(chat_report.markdown(table), end="")
  print(f"wrote {out}", file=sys.stderr)
  return table
