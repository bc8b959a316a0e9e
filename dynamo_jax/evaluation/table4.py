"""The paper's Table 4 at every suite size without trained weights:
`python -m dynamo_jax eval table4`.

For each DynaMo-Tn suite model (DynaMo-77M-T3 ... DynaMo-7.3B-T3):
  * overhead: the extra parameters of heads 2..n over the base Pythia,
    computed from the shapes ((n-1)(12 d^2 + 13 d) for one layer per head);
  * pass price: wall-clock of `generate(mode="dynamo", eps_b=1)` over
    `generate(mode="ar")`, both batch 1, the same prompt and new tokens, on
    RANDOM weights of that shape, measured on this device (eps_b = 1 emits
    one token per pass, so the ratio is what a DynaMo pass costs over an AR
    pass; interleaved calls, medians, compile excluded);
  * tokens per pass: measured with a TRAINED model (`--model`, default the
    embedded DynaMo-T3) on its test prompts at `--eps-b`;
  * projected speed-up = tokens per pass / pass price.

The speed-up is a PROJECTION, labelled so in every output: it assumes the
suite model at that size would emit as many tokens per pass as the trained
model given, which it only would if trained like it. Shapes whose bf16
weights exceed `--max-weight-gb` are listed with the reason they were not
timed. The paper's own overheads and speed-ups (tokens per pass, in effect)
stand beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dynamo_jax.errors import InputError

# DYNAMO.md section 1: overhead (%) and the speed-up reported.
PAPER = {
    "dynamo-77m-t3": (8.95, 3.00), "dynamo-180m-t3": (8.73, 2.19),
    "dynamo-430m-t3": (6.22, 3.00), "dynamo-1.1b-t3": (9.95, 2.15),
    "dynamo-1.5b-t3": (7.12, 2.07), "dynamo-2.9b-t3": (5.67, 2.06),
    "dynamo-7.3b-t3": (5.87, 2.57),
}


def parameter_counts(config) -> tuple[int, int]:
  """(base Pythia parameters, extra parameters of heads 2..n)."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.model.pythia import param_shapes
  import jax
  shapes = param_shapes(config)
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  heads = {k: v for k, v in shapes.items() if k.startswith("heads_")}
  return count(shapes) - count(heads), count(heads)


def pass_price(config, *, prompt_len: int = 16, new_tokens: int = 16,
               repeats: int = 3, seed: int = 0) -> dict:
  """Median seconds of AR and of DynaMo at eps_b 1 (interleaved calls) on
  random weights of `config`'s shape, and their ratio."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.decoding.generate import generate
  from dynamo_jax.model.pythia import init_params
  params = init_params(config, seed)
  prompt = np.random.default_rng(seed).integers(
      1, config.vocab_size, size=(1, prompt_len)).astype(np.int32)
  calls = {
      "ar": lambda: generate(config, params, prompt, max_new_tokens=new_tokens,
                             mode="ar", seed=0),
      "dynamo": lambda: generate(config, params, prompt,
                                 max_new_tokens=new_tokens, mode="dynamo",
                                 eps_b=1.0, seed=0),
  }
  times = {name: [] for name in calls}
  for call in calls.values():
    call()  # compile
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      np.asarray(call().tokens)
      times[name].append(time.perf_counter() - start)
  ar, dyn = (float(np.median(times[k])) for k in ("ar", "dynamo"))
  return {"ar_seconds": ar, "dynamo_eps1_seconds": dyn, "pass_price": dyn / ar,
          "ar_range": [min(times["ar"]), max(times["ar"])],
          "dynamo_range": [min(times["dynamo"]), max(times["dynamo"])]}


def tokens_per_pass(model, stream, *, eps_b: float, prompts: int = 8,
                    prompt_len: int = 32, new_tokens: int = 64,
                    seeds=(0, 1, 2)) -> float:
  """Tokens per forward pass of a trained model at eps_b, on prompts taken
  from `stream` (EOS-separated held-out token ids of the model's own
  vocabulary), with its co-occurrence table when it has one."""
  from dynamo_jax.evaluation import bench  # pylint: disable=import-outside-toplevel
  ids = bench.prompts_from_stream(stream, model.config.eos_token_id, prompts,
                                  prompt_len)
  q = bench.quality(model, model.cooc, ids, seeds, new_tokens, 0.7,
                    mode="dynamo", eps_b=eps_b)
  return float(q["tokens_per_pass"])


def build_table(model, stream=None, *, eps_b: float = 0.5, names=None,
                max_weight_gb: float = 2.0, repeats: int = 3,
                new_tokens: int = 16, measured_tpp: float | None = None,
                model_name: str | None = None, progress: bool = True) -> dict:
  """Table 4 rows (a JSON-able dict). The tokens per pass are measured on
  `model` with prompts from `stream` (its held-out token ids), unless
  `measured_tpp` gives them (e.g. measured on your own trained model)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from tqdm.auto import tqdm
  from dynamo_jax.model.config import DYNAMO_PRESETS, dynamo_preset
  names = list(names or DYNAMO_PRESETS)
  unknown = [n for n in names if n.lower() not in DYNAMO_PRESETS]
  if unknown:
    raise InputError(f"unknown suite models {unknown}; known: "
                     f"{sorted(DYNAMO_PRESETS)}.")
  if not 0.0 <= eps_b <= 1.0:
    raise InputError(f"--eps-b must lie in [0, 1], got {eps_b}.")
  tpp = (measured_tpp if measured_tpp is not None
         else tokens_per_pass(model, stream, eps_b=eps_b))
  rows = []
  for name in tqdm(names, desc="table 4", unit="model", disable=not progress):
    config = dynamo_preset(name, dtype="bfloat16", param_dtype="bfloat16")
    base, extra = parameter_counts(config)
    paper_overhead, paper_speedup = PAPER[name.lower()]
    row = {"model": name, "base": DYNAMO_PRESETS[name.lower()],
           "overhead_pct": 100.0 * extra / base,
           "paper_overhead_pct": paper_overhead,
           "paper_speedup": paper_speedup, "tokens_per_pass": tpp}
    gb = 2 * (base + extra) / 1e9
    if gb > max_weight_gb:
      row["not_timed"] = (f"{gb:.1f} GB of bf16 weights > --max-weight-gb "
                          f"{max_weight_gb}")
    else:
      row.update(pass_price(config, repeats=repeats, new_tokens=new_tokens))
      row["projected_speedup"] = tpp / row["pass_price"]
    rows.append(row)
  return {"kind": "projection",
          "note": ("projected_speedup = tokens_per_pass (measured on the "
                   "trained model below at eps_b) / pass_price (measured on "
                   "random weights of each shape on this device): a "
                   "projection, not a measurement of a trained suite model"),
          "eps_b": eps_b, "tokens_per_pass_from": (
              "given by the caller (--tokens-per-pass)" if measured_tpp is not None
              else model_name or "the embedded default model"),
          "device": jax.devices()[0].device_kind, "rows": rows}


def markdown(table: dict) -> str:
  head = ("| model | overhead (ours / paper) | pass price | tokens/pass | "
          "projected speed-up | paper speed-up |")
  lines = [head, "|---|---|---|---|---|---|"]
  for r in table["rows"]:
    price = (f"{r['pass_price']:.2f}" if "pass_price" in r
             else f"not timed: {r['not_timed']}")
    proj = (f"{r['projected_speedup']:.2f}x (projection)"
            if "projected_speedup" in r else "-")
    lines.append(f"| {r['model']} | {r['overhead_pct']:.2f}% / "
                 f"{r['paper_overhead_pct']:.2f}% | {price} | "
                 f"{r['tokens_per_pass']:.2f} | {proj} | "
                 f"{r['paper_speedup']:.2f}x |")
  lines.append("")
  lines.append(f"Projection on {table['device']}: {table['note']}.")
  return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "table4", help="the paper's Table 4 at every suite size: overheads, "
      "pass price on random weights, projected speed-up")
  p.add_argument("--model", help="trained DynaMo checkpoint whose tokens per "
                 "pass the projection uses (default: the embedded model)")
  p.add_argument("--data", help="held-out text for --model's prompts (.npy "
                 "of EOS-separated ids, .txt or .jsonl; default: the "
                 "embedded model's test sample, for the embedded model only)")
  p.add_argument("--tokens-per-pass", type=float,
                 help="use this tokens-per-pass figure instead of measuring")
  p.add_argument("--eps-b", type=float, default=0.5)
  p.add_argument("--models", help="comma-separated suite models (default all)")
  p.add_argument("--max-weight-gb", type=float, default=2.0,
                 help="time only shapes whose bf16 weights fit (default 2)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--out", help="directory for table4.json / .md")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=run)
  return p


def run(args) -> dict:
  from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
  if args.repeats < 1 or args.new_tokens < 1:
    raise InputError("--repeats and --new-tokens must be >= 1.")
  names = [n.strip() for n in args.models.split(",")] if args.models else None
  model, stream = None, None
  if args.tokens_per_pass is None:
    # pylint: disable=import-outside-toplevel
    from dynamo_jax.default_model import TEST_SAMPLE_FILE, default_model_dir
    from dynamo_jax.evaluation.ppl import read_stream
    if args.data is None and args.model is not None:
      raise InputError("give --data (held-out text for the model's prompts) "
                       "or --tokens-per-pass with --model.")
    model = load(args.model)
    stream = (read_stream(args.data, model.tokenizer,
                          eos_id=model.config.eos_token_id,
                          vocab_size=model.config.vocab_size)
              if args.data else
              np.load(os.path.join(default_model_dir(), TEST_SAMPLE_FILE)))
  table = build_table(model, stream, eps_b=args.eps_b, names=names,
                      max_weight_gb=args.max_weight_gb, repeats=args.repeats,
                      new_tokens=args.new_tokens,
                      measured_tpp=args.tokens_per_pass,
                      model_name=args.model, progress=not args.json)
  if args.out:
    from dynamo_jax.fileio import atomic_write_text  # pylint: disable=import-outside-toplevel
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "table4.json"),
                      json.dumps(table, indent=1))
    atomic_write_text(os.path.join(args.out, "table4.md"), markdown(table))
  print(json.dumps(table) if args.json else markdown(table))
  return table
