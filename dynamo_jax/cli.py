"""dynamo_jax: convert checkpoints, generate text, train DynaMo heads, count
co-occurrence tables, benchmark DynaMo against AR.

Every subcommand reports bad input as one line, `error: ...`, and exits 2;
Ctrl-C and SIGTERM end it with one line and exit 130 / 143, after any output
being written was either finished or removed."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from dynamo_jax.errors import DynamoError


def _convert(args) -> None:
  from dynamo_jax.convert import native  # pylint: disable=import-outside-toplevel
  from dynamo_jax.convert.hf import to_hf  # pylint: disable=import-outside-toplevel
  if args.to_hf:
    if not native.is_native(args.src):
      raise DynamoError(f"--to-hf expects a dynamo_jax checkpoint directory as "
                        f"SRC; {args.src} has no {native.CONFIG_FILE}.")
    config, params = native.load(args.src)
    to_hf(config, params, args.out, progress=True, tokenizer_dir=args.src)
  else:
    native.convert_hf_to_native(args.src, args.out, revision=args.revision,
                                dtype=args.dtype, progress=True)
  print(f"wrote {args.out}", file=sys.stderr)


def _load_model(model: str | None, revision: str | None, dtype: str | None):
  """(config, params, tokenizer, cooc)."""
  from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
  loaded = load(model, revision=revision, dtype=dtype)
  return loaded.config, loaded.params, loaded.tokenizer, loaded.cooc


def _generate(args) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynamo_jax.decoding import generate  # pylint: disable=import-outside-toplevel
  if not args.prompt:
    raise DynamoError("--prompt is empty; give some text to continue.")
  try:
    args.prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise DynamoError("--prompt is not valid UTF-8 text (check the terminal's "
                      "or the file's encoding, e.g. convert it with iconv "
                      "-t UTF-8).") from None
  config, params, tokenizer, cooc = _load_model(args.model, args.revision,
                                                args.dtype)
  if args.cooc:
    from dynamo_jax import cooc as cooc_lib  # pylint: disable=import-outside-toplevel
    cooc = cooc_lib.load(args.cooc)
    cooc.check_compatible(vocab_hash=cooc_lib.vocab_hash(tokenizer),
                          vocab_size=config.vocab_size,
                          num_heads=config.num_token_heads)
  if args.no_cooc or not (args.mode == "dynamo" or args.tree):
    cooc = None
  ids = np.asarray([tokenizer.encode(args.prompt)], np.int32)
  kwargs = dict(max_new_tokens=args.max_new_tokens, mode=args.mode,
                greedy=args.greedy, temperature=args.temperature, seed=args.seed,
                eps_b=args.eps_b, cooc=cooc, tree=args.tree,
                k_tree=args.k_tree)
  generate(config, params, ids, **kwargs)  # compile outside the timed run
  start = time.perf_counter()
  out = generate(config, params, ids, **kwargs)
  seconds = time.perf_counter() - start
  new = out.tokens[0].tolist()
  text = tokenizer.decode(new)
  result = {"text": text, "token_ids": new, "forward_passes": out.forward_passes,
            "tokens_per_pass": out.tokens_per_pass, "seconds": seconds}
  if args.json:
    print(json.dumps(result))
  else:
    print(args.prompt + text)
    print(f"\n[{len(new)} tokens in {out.forward_passes} forward passes: "
          f"{out.tokens_per_pass:.2f} tokens/pass, {seconds:.3f} s]",
          file=sys.stderr)


def _train(args) -> None:
  # pylint: disable=import-outside-toplevel
  from dynamo_jax import distributed
  from dynamo_jax.training.config import load_config
  from dynamo_jax.training.loop import train
  distributed.initialize_from_args(args)
  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f"steps={args.steps}")
  last = train(load_config(args.config, overrides), args.workdir)
  print(json.dumps(last))


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line that says where the help is; exit 2."""

  def error(self, message):
    self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m dynamo_jax",
                   description=__doc__.split("\n\n", maxsplit=1)[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert a checkpoint")
  p.add_argument("src", help="HF checkpoint directory or hub id (or, with "
                 "--to-hf, a dynamo_jax checkpoint directory)")
  p.add_argument("out", help="output directory (must not exist or be empty)")
  p.add_argument("--revision", help="hub revision, e.g. step143000")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                 help="parameter dtype of the output (default float32)")
  p.add_argument("--to-hf", action="store_true",
                 help="convert a dynamo_jax checkpoint to an HF directory")
  p.set_defaults(func=_convert)

  p = sub.add_parser("generate", help="generate text")
  p.add_argument("--model", help="checkpoint directory (HF or dynamo_jax) or "
                 "hub id; default: the embedded DynaMo-T3 (see "
                 "dynamo_jax/default_model/MODEL_CARD.md)")
  p.add_argument("--revision")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--prompt", required=True)
  p.add_argument("--mode", default="ar", choices=["ar", "dynamo", "verified"],
                 help="ar: one token per pass; dynamo: the paper's dynamic "
                 "multi-token sampling; verified: heads draft, head 1 checks "
                 "(AR's output distribution)")
  p.add_argument("--eps-b", type=float, default=0.5,
                 help="DynaMo back-off threshold in [0, 1] (1 = AR)")
  p.add_argument("--tree", type=int, default=0, metavar="T",
                 help="verified mode: verify a tree of T draft paths (0: one "
                 "draft chain)")
  p.add_argument("--k-tree", type=int, default=8, metavar="K",
                 help="top-k ids per head the tree's paths come from")
  p.add_argument("--cooc", help="co-occurrence table file (default: the "
                 "model's own, when it ships one)")
  p.add_argument("--no-cooc", action="store_true",
                 help="no co-occurrence weighting")
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--json", action="store_true",
                 help="print one JSON object instead of text")
  p.set_defaults(func=_generate)

  p = sub.add_parser("train", help="train DynaMo token heads")
  p.add_argument("--config", required=True,
                 help="a name in experiments/configs/ (e.g. tiny-test, "
                 "dynamo-77m-t3) or a JSON file")
  p.add_argument("--workdir", required=True,
                 help="run directory: checkpoints, metrics.jsonl, tensorboard;"
                 " re-running the same command resumes")
  p.add_argument("--steps", type=int, help="total steps (overrides config)")
  from dynamo_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.add_arguments(p)
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="config overrides, e.g. optim.lr_base=1e-5 data.paths="
                 "'[\"a.bin\"]'")
  p.set_defaults(func=_train)

  # pylint: disable=import-outside-toplevel
  from dynamo_jax.cooc import cli as cooc_cli
  from dynamo_jax.evaluation import bench
  from dynamo_jax.evaluation import cli as eval_cli
  cooc_cli.add_parser(sub).set_defaults(func=cooc_cli.run)
  from dynamo_jax.chat import repl
  repl.add_parser(sub).set_defaults(func=repl.run)
  bench.add_parser(sub).set_defaults(func=bench.run)
  eval_cli.add_parser(sub)
  return parser


class Terminated(SystemExit):
  """SIGTERM, raised in the main thread so cleanups (`finally`, temp files)
  run as they do for Ctrl-C."""


def _on_sigterm(signum, frame):  # pylint: disable=unused-argument
  raise Terminated(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    args.func(args)
  except DynamoError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:  # the machine's, not ours: permissions, disk full
    where = f" ({e.filename})" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted: {args.command} stopped; what it was writing was "
          "finished or removed, never left half-written.", file=sys.stderr)
    return 130
  except Terminated as e:
    print(f"terminated: {args.command} stopped by SIGTERM; what it was "
          "writing was finished or removed, never left half-written.",
          file=sys.stderr)
    return e.code
  return 0


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())
