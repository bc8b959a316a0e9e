"""`python -m dynamo_jax eval lm-eval`: lm-evaluation-harness tasks (NLU,
DYNAMO.md section 4) on a dynamo_jax model, scored by head 1.

  from dynamo_jax.evaluation.harness import DynamoLM
  lm_eval.simple_evaluate(model=DynamoLM(), tasks=["piqa"])
  lm_eval.simple_evaluate(model="dynamo_jax", model_args="pretrained=DIR",
                          tasks=["piqa"])  # after importing this module

lm-eval is an optional dependency (pip install -e .[eval]). This module is
cheap to import: `DynamoLM` lives in harness_lm.py, which imports lm_eval
and is loaded on first access to `DynamoLM`. Importing this module only
registers the name "dynamo_jax" with lm-eval's model registry as a lazy
"module:class" placeholder, when lm-eval is installed (lm_eval.api.registry:
~35 ms, none of lm-eval's models, tasks or torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from dynamo_jax import fileio
from dynamo_jax.errors import DynamoError

MODEL_NAME = "dynamo_jax"
_CLASS_PATH = "dynamo_jax.evaluation.harness_lm:DynamoLM"
MISSING = ("lm-eval is not installed: pip install -e .[eval] (or pip install "
           "lm-eval)")


def _require_lm_eval() -> None:
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise DynamoError(MISSING) from None


def _harness_lm():
  _require_lm_eval()
  from dynamo_jax.evaluation import harness_lm  # pylint: disable=import-outside-toplevel
  return harness_lm


def __getattr__(name):
  if name == "DynamoLM":
    return _harness_lm().DynamoLM
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
  """Registers "dynamo_jax" with lm-eval's model registry as a placeholder
  that imports harness_lm when first looked up (a no-op when registered)."""
  # pylint: disable=import-outside-toplevel
  from lm_eval.api import registry
  if not hasattr(registry, "model_registry"):
    # An lm-eval without lazy placeholders (0.4.9 keeps a plain dict):
    # DynamoLM registers itself when first accessed.
    return
  # lm_eval.models registers lm-eval's own models as placeholders; get_model
  # only does so when the registry is empty, which ours would stop.
  import lm_eval.models  # noqa: F401  pylint: disable=unused-import
  model_registry = registry.model_registry
  if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target=_CLASS_PATH)


def _installed() -> bool:
  try:
    return importlib.util.find_spec("lm_eval") is not None
  except ValueError:  # sys.modules["lm_eval"] is None: imports of it fail
    return False


if _installed():
  register()


# ---- tasks -------------------------------------------------------------------

_MANAGERS: dict = {}


def task_manager(include_path: str | None = None):
  """lm-eval's TaskManager (its own tasks plus `include_path`'s), built once
  per path: indexing lm-eval's ~15k task configs takes seconds."""
  _require_lm_eval()
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  if include_path is not None and not os.path.isdir(include_path):
    raise DynamoError(f"--include-path {include_path} is not a directory of "
                      "task YAML files.")
  if include_path not in _MANAGERS:
    _MANAGERS[include_path] = TaskManager(include_path=include_path)
  return _MANAGERS[include_path]


def check_tasks(manager, tasks: list[str]) -> None:
  """DynamoError naming the tasks (names, globs or YAML files) that match
  nothing, and how to list the known ones."""
  missing = [t for t in tasks
             if not manager.match_tasks([t]) and not os.path.isfile(t)]
  if missing:
    raise DynamoError(
        f"unknown lm-eval task(s): {', '.join(missing)}; list the known ones "
        "with `lm-eval ls tasks` or lm_eval.tasks.TaskManager().all_tasks, "
        "and pass --include-path DIR (TaskManager(include_path=DIR)) for "
        "task YAML files of your own.")


def evaluate(lm, tasks: list[str], *, manager=None, num_fewshot=None,
             limit=None, bootstrap_iters: int = 100000) -> dict:
  """lm_eval.simple_evaluate of `lm` (a DynamoLM, or any lm-eval model or
  registered name) on `tasks`, unknown tasks refused first; no samples."""
  _require_lm_eval()
  from lm_eval import simple_evaluate  # pylint: disable=import-outside-toplevel
  manager = manager or task_manager()
  check_tasks(manager, tasks)
  results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot,
                            limit=limit, task_manager=manager,
                            log_samples=False, bootstrap_iters=bootstrap_iters)
  results.pop("samples", None)
  return results


# ---- CLI ---------------------------------------------------------------------

def _limit(text: str) -> int | float:
  """lm-eval's --limit: a count of examples per task, or a fraction < 1."""
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not value > 0:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a positive number of examples (or a fraction < 1)")
  return int(value) if value >= 1 and value.is_integer() else value


def _non_negative(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
  return int(text)


def _positive(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
  return int(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `lm-eval` on `subparsers` (func=run); returns its parser."""
  p = subparsers.add_parser(
      "lm-eval", help="lm-evaluation-harness tasks, head 1 (needs the eval "
      "extra: pip install -e .[eval])",
      description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--model", default=None, metavar="DIR_OR_ID",
                 help="checkpoint directory (HF or dynamo_jax) or hub id; "
                 "default: the embedded default model")
  p.add_argument("--tasks", required=True, metavar="T1,T2",
                 help="comma-separated lm-eval task names, globs or YAML "
                 "files, e.g. arc_easy,piqa (list: lm-eval ls tasks)")
  p.add_argument("--include-path", default=None, metavar="DIR",
                 help="directory of task YAML files of your own")
  p.add_argument("--num-fewshot", type=_non_negative, default=None,
                 metavar="K", help="few-shot examples (default: the task's)")
  p.add_argument("--limit", type=_limit, default=None, metavar="N",
                 help="examples per task (a fraction when < 1); for tests")
  p.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                 help="rows per forward pass (default 8)")
  p.add_argument("--model-args", default="", metavar="KEY=VALUE,...",
                 help="DynamoLM options as key=value,... e.g. mode=dynamo,"
                 "eps_b=0.3,max_gen_toks=64 (generation tasks)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object instead of tables")
  p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON object to "
                 "this file")
  p.set_defaults(func=run)
  return p


def _write_json(path: str, text: str) -> None:
  """Writes `text` to `path` whole or not at all."""
  try:
    fileio.atomic_write_text(path, text + "\n")
  except OSError as e:
    raise DynamoError(f"cannot write --out {path}: {e.strerror or e}; choose a "
                      "writable location.") from None


def run(args) -> dict:
  _require_lm_eval()
  # pylint: disable=import-outside-toplevel
  from lm_eval.utils import (handle_non_serializable, make_table,
                             simple_parse_args_string)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise DynamoError("--tasks is empty; name lm-eval tasks, e.g. "
                      "--tasks arc_easy,piqa (list: lm-eval ls tasks).")
  options = simple_parse_args_string(args.model_args)
  if "pretrained" in options:
    raise DynamoError("give the model with --model, not in --model-args.")
  if args.batch_size is not None:
    options["batch_size"] = args.batch_size
  _harness_lm().parse_options(options)  # bad options before the slow steps
  manager = task_manager(args.include_path)
  check_tasks(manager, tasks)  # before the model loads
  lm = _harness_lm().DynamoLM(pretrained=args.model, **options)
  results = evaluate(lm, tasks, manager=manager, num_fewshot=args.num_fewshot,
                     limit=args.limit)
  text = json.dumps(results, default=handle_non_serializable)
  if args.out:
    _write_json(args.out, text)
  if args.json:
    print(text)
  else:
    print(make_table(results))
    if results.get("groups"):
      print(make_table(results, "groups"))
  sys.stdout.flush()
  return results
