"""The paper's measurements as commands: `python -m dynamo_jax eval ...`.

Each subcommand lives in its own module with `add_parser(subparsers)` (which
sets `func`) and a `run(args)`; this module only gathers them, so every
module must be cheap to import (optional dependencies such as lm-eval are
imported inside `run`).
"""

from __future__ import annotations

import importlib

# Subcommand modules, in the order `eval --help` lists them.
SUBCOMMANDS = ("ppl", "harness", "completions", "judge", "chat_eval",
               "table4")


def add_parser(subparsers):
  """Registers `eval` and its subcommands; returns the `eval` parser."""
  p = subparsers.add_parser(
      "eval", help="evaluate a model in the paper's terms (perplexities, "
      "lm-eval tasks, completions, judged quality)",
      description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
  for name in SUBCOMMANDS:
    importlib.import_module(f"dynamo_jax.evaluation.{name}").add_parser(sub)
  return p
