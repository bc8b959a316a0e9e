"""`python -m dynamo_jax bench`: AR vs DynaMo decoding on one model.

On prompts from a held-out token stream, with the same temperature and the
same per-row seeds for every mode (sampling, never greedy), for each mode
(AR; DynaMo at eps_b; verified with one draft chain; verified with a tree of
`tree` draft paths) it reports (`summary` has one row per mode):
- tokens per forward pass (AR is 1 by definition);
- pass price: wall-clock per pass over AR's (evaluation/prices.py), and the
  wall-clock speed-up over plain AR (`mode="ar"`: head 1 only, no head
  layers run) at batch 1: all modes timed in one process, calls
  interleaved, medians of `repeats` with their ranges, compile excluded;
  also DynaMo's own code at eps_b = 1, which emits AR's exact tokens through
  the DynaMo step (one token per pass: its time over AR's is DynaMo's pass
  price at one token per pass);
- with `project_shape`, labelled as a projection: the speed-up these tokens
  per pass would give at a suite shape, from pass prices measured on random
  weights of that shape on this device;
- the base model's (head 1's) per-token NLL of DynaMo's continuations over
  AR's, and the distinct-2 ratio (unique bigrams / all bigrams per
  continuation, averaged over rows) of DynaMo's over AR's;
- the split of one DynaMo pass into model and sampler time;
- optionally the same for a sweep of eps_b (`sweep`), with a JSON and a PNG.
Quality figures come from one batched run of prompts x seeds rows; speed
figures from batch-1 runs on the first `timing_prompts` prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
import numpy as np

from dynamo_jax.cooc import lookup
from dynamo_jax.decoding.dynamo import SamplerSettings
from dynamo_jax.decoding.generate import generate
from dynamo_jax.errors import InputError
from dynamo_jax.evaluation import prices, timing
from dynamo_jax.evaluation.perplexity import split_documents
from dynamo_jax.evaluation.quality import continuation_nll, mean_distinct_n

# What the embedded model should reach on a 2-core CPU (README "Benchmarks").
TARGETS = {"tokens_per_pass_min": 2.0, "nll_ratio_max": 1.05,
           "distinct_2_ratio_min": 0.9, "speedup_min": 1.3}


def prompts_from_stream(stream, eos_id: int, count: int,
                        length: int) -> np.ndarray:
  """int32 [count, length]: prompts spread evenly over a token stream, each
  inside one document (windows at multiples of `length`, no EOS inside)."""
  candidates = []
  for doc in split_documents(np.asarray(stream), eos_id):
    body = doc[:-1] if doc[-1] == eos_id else doc
    candidates += [body[s:s + length]
                   for s in range(0, body.size - length + 1, length)]
  if len(candidates) < count:
    raise ValueError(f"the stream holds only {len(candidates)} prompts of "
                     f"{length} tokens; asked for {count}.")
  pick = np.linspace(0, len(candidates) - 1, count).round().astype(int)
  return np.stack([candidates[i] for i in pick]).astype(np.int32)


def _load(model_dir_or_loaded):
  if isinstance(model_dir_or_loaded, (str, os.PathLike)):
    from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
    return load(os.fspath(model_dir_or_loaded))
  return model_dir_or_loaded


def _table(weights, kw):
  """The table where a mode uses one: DynaMo's sampler and tree proposals."""
  return weights if kw.get("mode") == "dynamo" or kw.get("tree") else None


def quality(model, weights, prompts, seeds, new_tokens, temperature, **kw):
  """Tokens per pass, head 1's mean NLL of the continuations and their
  distinct-2, from one batched `generate` of prompts x seeds rows (row
  seed s * len(prompts) + i); `kw` goes to `generate` (mode, eps_b, k,
  alpha, use_cooc, blur, otsu, ...); `weights` is the table, used in
  mode "dynamo" only."""
  rows = np.concatenate([prompts] * len(seeds))
  row_seeds = [s * len(prompts) + i for s in seeds for i in range(len(prompts))]
  out = generate(model.config, model.params, rows, max_new_tokens=new_tokens,
                 temperature=temperature, seed=row_seeds,
                 cooc=_table(weights, kw), **kw)
  nll = continuation_nll(model.config, model.params, rows, out.tokens)
  return {"tokens_per_pass": out.tokens_per_pass, "nll": float(nll.mean()),
          "distinct_2": mean_distinct_n(out.tokens, 2)}


def _seconds(model, weights, prompts, new_tokens, temperature, repeats, **kw):
  """Sum over prompts of the median batch-1 wall time, and tokens/pass."""
  total, tpp = 0.0, []
  for i, prompt in enumerate(prompts):
    def call(prompt=prompt, i=i):
      return generate(model.config, model.params, prompt[None],
                      max_new_tokens=new_tokens, temperature=temperature,
                      seed=[i], cooc=_table(weights, kw), **kw)
    total += timing.median_seconds(call, repeats)
    tpp.append(call().tokens_per_pass)
  return total, float(np.mean(tpp))


def _mode_report(model, weights, prompts, args, ar, ar_seconds, **kw):
  q = quality(model, weights, prompts, args["seeds"], args["new_tokens"],
               args["temperature"], **kw)
  sec, _ = _seconds(model, weights, prompts[:args["timing_prompts"]],
                    args["new_tokens"], args["temperature"], args["repeats"],
                    **kw)
  return {**q, "nll_ratio": q["nll"] / ar["nll"],
          "distinct_2_ratio": q["distinct_2"] / ar["distinct_2"],
          "seconds": sec, "speedup_vs_ar": ar_seconds / sec}


def _meets(r) -> dict[str, bool]:
  return {"tokens_per_pass": r["tokens_per_pass"] >= TARGETS["tokens_per_pass_min"],
          "nll_ratio": r["nll_ratio"] <= TARGETS["nll_ratio_max"],
          "distinct_2_ratio": r["distinct_2_ratio"] >= TARGETS["distinct_2_ratio_min"],
          "speedup": r["speedup_vs_ar"] >= TARGETS["speedup_min"]}


def run_bench(model_dir_or_loaded, prompts, *, eps_b: float = 0.5,
              temperature: float = 0.7, new_tokens: int = 64,
              seeds: Sequence[int] = (0, 1, 2), timing_prompts: int = 4,
              repeats: int = 5, k: int = 50, use_cooc: bool = True,
              sweep: Sequence[float] = (), sweep_out: str | None = None,
              sweep_without_table: bool = False, tree: int = 8,
              k_tree: int = 8, project_shape: str | None = None,
              matmul: str = "xla", cooc_lookup: str = "xla") -> dict:
  """AR vs DynaMo, verified chain and verified tree on `prompts` (int [B,
  P]); see the module docstring for what is measured. `model_dir_or_loaded`
  is a checkpoint directory or a `dynamo_jax.Model`. With
  `sweep_without_table` (and a table in use) the eps_b sweep runs twice,
  with and without the co-occurrence weighting (the paper's CO ablation),
  each row saying which in "cooc". `matmul="native"` decodes (and projects)
  with the native CPU matmul over packed float32 weights
  (kernels/cpu_matmul.py); `cooc_lookup="native"` reads the co-occurrence
  table with the native CPU lookup (kernels/cpu_cooc.py). Returns one
  JSON-able dict."""
  if matmul not in ("xla", "native"):
    raise InputError(f"matmul must be 'xla' or 'native', got {matmul!r}.")
  if cooc_lookup not in lookup.LOOKUPS:
    raise InputError(f"cooc_lookup must be one of {lookup.LOOKUPS}, got "
                     f"{cooc_lookup!r}.")
  model = _load(model_dir_or_loaded)
  if model.config.weight_layout == "panels":  # packed by the caller
    matmul = "native"
  if matmul == "native" and model.config.weight_layout == "standard":
    from dynamo_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
    config, params = cpu_matmul.pack_params(model.config, model.params)
    model = dataclasses.replace(model, config=config, params=params)
  prompts = np.asarray(prompts, np.int32)
  n = model.config.num_token_heads
  # The table's device view, built once (generate takes it as it is).
  weights = None
  if use_cooc and model.cooc is not None:
    model.cooc.check_compatible(vocab_size=model.config.vocab_size,
                                num_heads=n)
    weights = lookup.device_table(model.cooc, lookup=cooc_lookup)
  args = dict(seeds=list(seeds), new_tokens=new_tokens, temperature=temperature,
              timing_prompts=timing_prompts, repeats=repeats)
  dyn = dict(mode="dynamo", k=k)
  modes = {"dynamo": dict(dyn, eps_b=eps_b), "dynamo_eps1": dict(dyn, eps_b=1.0),
           "verified": dict(mode="verified"),
           "tree": dict(mode="verified", tree=tree, k_tree=k_tree)}
  speed = prices.timed_modes(
      model.config, model.params, prompts[:timing_prompts],
      {name: dict(kw, cooc=_table(weights, kw)) for name, kw in modes.items()},
      new_tokens=new_tokens, repeats=repeats, temperature=temperature)
  ar = quality(model, None, prompts, seeds, new_tokens, temperature, mode="ar")
  ar_seconds = speed["ar"]["seconds"]
  report = {
      "device": jax.devices()[0].device_kind,
      "model": {"num_token_heads": n, "hidden_size": model.config.hidden_size,
                "num_layers": model.config.num_layers,
                "vocab_size": model.config.vocab_size,
                "cooc": weights is not None},
      "setup": {**args, "prompts": int(prompts.shape[0]),
                "prompt_len": int(prompts.shape[1]), "eps_b": eps_b, "k": k,
                "tree": tree, "k_tree": k_tree, "sampling": True,
                "matmul": matmul,
                "cooc_lookup": cooc_lookup if weights is not None else None},
      "ar": {**ar, "seconds": ar_seconds,
             "seconds_range": speed["ar"]["seconds_range"],
             "per_pass_ms": speed["ar"]["per_pass_ms"],
             "tokens_per_second": timing_prompts * new_tokens / ar_seconds},
      "dynamo_eps1_seconds": speed["dynamo_eps1"]["seconds"],
      "dynamo_eps1_pass_price": speed["dynamo_eps1"]["pass_price"],
  }
  for name in ("dynamo", "verified", "tree"):
    q = quality(model, weights, prompts, seeds, new_tokens, temperature,
                **modes[name])
    t = speed[name]
    report[name] = {**q, "nll_ratio": q["nll"] / ar["nll"],
                    "distinct_2_ratio": q["distinct_2"] / ar["distinct_2"],
                    **{key: t[key] for key in (
                        "seconds", "seconds_range", "speedup_vs_ar",
                        "pass_price", "per_pass_ms")},
                    "timed_tokens_per_pass": t["tokens_per_pass"]}
  report["dynamo"]["speedup_vs_dynamo_eps1"] = (
      report["dynamo_eps1_seconds"] / report["dynamo"]["seconds"])
  report["dynamo"]["meets_targets"] = _meets(report["dynamo"])
  report["summary"] = [
      {"mode": "ar", "tokens_per_pass": 1.0, "pass_price": 1.0,
       "speedup_vs_ar": 1.0, "nll_ratio": 1.0, "distinct_2_ratio": 1.0}] + [
           {"mode": label, **{key: report[name][key] for key in (
               "tokens_per_pass", "pass_price", "speedup_vs_ar", "nll_ratio",
               "distinct_2_ratio")}}
           for name, label in (("dynamo", f"dynamo eps_b={eps_b}"),
                               ("verified", "verified chain"),
                               ("tree", f"verified tree ({tree} paths)"))]
  settings = SamplerSettings(k=k, use_cooc=weights is not None)
  report["step_split"] = timing.step_split(
      model.config, model.params, prompts[:1], weights, eps_b=eps_b,
      temperature=temperature, settings=settings)
  report["step_split"]["ar_pass_ms"] = timing.ar_pass_ms(
      model.config, model.params, prompts[:1])
  report["targets"] = TARGETS
  if project_shape:
    report["projection"] = prices.projection(
        project_shape, {name: report[name]["tokens_per_pass"]
                        for name in ("dynamo", "verified", "tree")},
        {name: modes[name] for name in ("dynamo", "verified", "tree")},
        repeats=max(1, min(repeats, 3)), matmul=matmul)
  if sweep:
    tables = [weights] + ([None] if sweep_without_table and weights is not None
                          else [])
    rows = [{"eps_b": float(e), "cooc": w is not None, **_mode_report(
        model, w, prompts, args, ar, ar_seconds, eps_b=float(e), **dyn)}
            for w in tables for e in sweep]
    for r in rows:
      r["meets_targets"] = _meets(r)
    report["sweep"] = rows
    report["closest"] = closest(rows)
    if sweep_out:
      save_sweep(report, sweep_out)
  return report


def closest(rows: list[dict]) -> dict:
  """The sweep setting nearest the targets: among the settings meeting both
  quality targets, the one with the most tokens per pass (else the one
  with the smallest NLL ratio)."""
  ok = [r for r in rows if r["meets_targets"]["nll_ratio"]
        and r["meets_targets"]["distinct_2_ratio"]]
  best = (max(ok, key=lambda r: r["tokens_per_pass"]) if ok
          else min(rows, key=lambda r: r["nll_ratio"]))
  return {"eps_b": best["eps_b"], "cooc": best.get("cooc"),
          "meets_quality": bool(ok),
          "all_targets": all(best["meets_targets"].values())}


def save_sweep(report: dict, out_dir: str) -> None:
  """eps_b_sweep.json and eps_b_sweep.png in out_dir."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  rows = report["sweep"]
  with open(os.path.join(out_dir, "eps_b_sweep.json"), "w") as fh:
    json.dump({"setup": report["setup"], "targets": TARGETS, "sweep": rows,
               "closest": report["closest"]}, fh, indent=1)
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  panels = [("tokens_per_pass", TARGETS["tokens_per_pass_min"], "tokens / pass"),
            ("speedup_vs_ar", TARGETS["speedup_min"], "wall-clock speed-up vs AR"),
            ("nll_ratio", TARGETS["nll_ratio_max"], "NLL ratio (DynaMo / AR)"),
            ("distinct_2_ratio", TARGETS["distinct_2_ratio_min"],
             "distinct-2 ratio (DynaMo / AR)")]
  for ax, (key, target, title) in zip(axes, panels):
    for cooc in sorted({r.get("cooc") for r in rows}, key=str):
      part = [r for r in rows if r.get("cooc") == cooc]
      ax.plot([r["eps_b"] for r in part], [r[key] for r in part], "o-",
              label={True: "with table", False: "no table"}.get(cooc, "DynaMo"))
    ax.axhline(target, color="r", ls="--", lw=1, label="target")
    ax.set_xlabel("eps_b")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "eps_b_sweep.png"), dpi=110)
  plt.close(fig)


def eps_b_list(text: str) -> list[float]:
  """'0,0.1,0.3' -> [0.0, 0.1, 0.3], checked while the arguments are parsed
  (before a model is loaded)."""
  values = []
  for part in text.split(","):
    if not part.strip():
      continue
    try:
      value = float(part)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{part.strip()!r} is not a number; give eps_b values in [0, 1] "
          "separated by commas, e.g. 0,0.1,0.3") from None
    if not 0.0 <= value <= 1.0:
      raise argparse.ArgumentTypeError(f"eps_b {value} is outside [0, 1]")
    values.append(value)
  return values


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "bench", help="AR vs DynaMo: tokens/pass, wall-clock, NLL and "
      "distinct-2 ratios (prints one JSON object)")
  p.add_argument("--model", default=None,
                 help="dynamo_jax checkpoint directory (default: the "
                 "embedded default model)")
  p.add_argument("--prompt-tokens", default=None,
                 help=".npy EOS-separated token stream to take prompts from "
                 "(default: the model directory's test_sample.npy)")
  p.add_argument("--num-prompts", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
  p.add_argument("--eps-b", type=float, default=0.5)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--timing-prompts", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-cooc", action="store_true")
  p.add_argument("--sweep", default=[], type=eps_b_list,
                 help="comma-separated eps_b values to sweep, e.g. 0,0.1,0.3")
  p.add_argument("--sweep-out", default=None,
                 help="directory for eps_b_sweep.json / .png")
  p.add_argument("--sweep-without-table", action="store_true",
                 help="sweep each eps_b also without the co-occurrence table")
  p.add_argument("--tree", type=_positive, default=8, metavar="T",
                 help="draft paths of the verified tree mode (default 8)")
  p.add_argument("--k-tree", type=_positive, default=8, metavar="K",
                 help="top-k ids per head the tree's paths come from")
  p.add_argument("--matmul", default="xla", choices=["xla", "native"],
                 help="the model's matmuls: XLA's (default) or, on CPU, the "
                 "native few-row kernel over packed float32 weights "
                 "(kernels/cpu_matmul.py; needs a C++ compiler)")
  p.add_argument("--cooc-lookup", default="xla", choices=["xla", "native"],
                 help="the co-occurrence table's lookups: the jnp walk "
                 "(default) or, on CPU, the native kernel "
                 "(kernels/cpu_cooc.py; needs a C++ compiler)")
  p.add_argument("--project-shape", default=None, metavar="NAME",
                 type=_suite_shape,
                 help="also project the speed-up at this suite shape (e.g. "
                 "dynamo-1.5b-t3) from pass prices on its random weights")
  return p


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
  return value


def _suite_shape(text: str) -> str:
  from dynamo_jax.model.config import DYNAMO_PRESETS  # pylint: disable=import-outside-toplevel
  if text.lower() not in DYNAMO_PRESETS:
    raise argparse.ArgumentTypeError(
        f"unknown suite shape {text!r}; known: {', '.join(sorted(DYNAMO_PRESETS))}")
  return text.lower()


def run(args) -> dict:
  from dynamo_jax.api import load  # pylint: disable=import-outside-toplevel
  from dynamo_jax.default_model import (  # pylint: disable=import-outside-toplevel
      TEST_SAMPLE_FILE, default_model_dir)
  directory = args.model or default_model_dir()
  model = load(directory)
  stream_path = args.prompt_tokens or os.path.join(directory, TEST_SAMPLE_FILE)
  prompts = prompts_from_stream(np.load(stream_path),
                                model.config.eos_token_id, args.num_prompts,
                                args.prompt_len)
  report = run_bench(model, prompts, eps_b=args.eps_b,
                     temperature=args.temperature, new_tokens=args.new_tokens,
                     seeds=range(args.seeds),
                     timing_prompts=args.timing_prompts,
                     repeats=args.repeats, use_cooc=not args.no_cooc,
                     sweep=args.sweep, sweep_out=args.sweep_out,
                     sweep_without_table=args.sweep_without_table,
                     tree=args.tree, k_tree=args.k_tree,
                     project_shape=args.project_shape, matmul=args.matmul,
                     cooc_lookup=args.cooc_lookup)
  report["model"]["directory"] = directory
  json.dump(report, sys.stdout)
  print()
  return report
