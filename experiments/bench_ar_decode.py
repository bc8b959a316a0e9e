"""AR decode throughput: our jitted decoder vs transformers' PyTorch generate.

Measures tokens/s of plain greedy autoregressive decoding, batch 1, on CPU,
for Pythia-shaped models with random weights. Both sides run the SAME weights:
we draw params with `dynamo_jax.init_params`, write them as an HF directory
with `dynamo_jax.to_hf`, and load that into `GPTNeoXForCausalLM` (float32,
eval, torch's default thread count).

Per model: one warm-up call per side (for us it compiles prefill + scan), then
timing rounds, each timing one call of ours and one of torch back to back
(interleaved, so a transient load hits both sides alike). Each call decodes
exactly `--new-tokens` tokens after a 16-token random prompt, and
tok/s = new_tokens / wall seconds (prefill included on both sides). We report
medians, the ratio ours/torch from the same run (target 1.5), and how many
greedy tokens agree between the two.

Contention: torch's OpenMP threads spin-wait at barriers, so another busy
process (e.g. a test run) can slow torch by 10x or more while barely touching
XLA, inflating the ratio. For every timed call we record the CPU that OTHER
processes used meanwhile (from /proc/stat minus our own rusage), as a
fraction of all cores. A call is clean when that fraction is <= 0.1; rounds
continue until each side has `--repeats` clean calls or `--max-rounds` is
reached. Medians are over clean calls (`medians_over: "clean"`) whenever
both sides have at least one, else over all calls; `contended: true` marks
a model where a side got fewer than `--repeats` clean calls, and
`ratio_all_calls` gives the ratio over every call for comparison.

Prints one JSON object to stdout. Run from the repo root:

  .venv/bin/python experiments/bench_ar_decode.py
  .venv/bin/python experiments/bench_ar_decode.py --models pythia-70m \
      --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import dynamo_jax
from dynamo_jax.model.config import PRESETS

TARGET_RATIO = 1.5
PROMPT_LEN = 16
CONTENDED_FRAC = 0.1
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> tuple[float, float] | None:
  """(busy CPU seconds of the whole machine, of this process), or None."""
  try:
    with open("/proc/stat") as fh:
      fields = [int(x) for x in fh.readline().split()[1:]]
  except OSError:
    return None
  # user nice system idle iowait irq softirq steal ...: all but idle/iowait.
  busy = sum(fields[:8]) - fields[3] - fields[4]
  own = resource.getrusage(resource.RUSAGE_SELF)
  return busy / _TICK, own.ru_utime + own.ru_stime


def _timed(fn) -> tuple[float, float | None]:
  """(wall seconds of one blocking call, other processes' CPU fraction)."""
  cpu0 = _cpu_seconds()
  start = time.perf_counter()
  fn()
  wall = time.perf_counter() - start
  cpu1 = _cpu_seconds()
  if cpu0 is None or cpu1 is None:
    return wall, None
  other = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
  return wall, max(0.0, other / (wall * os.cpu_count()))


def _clean(calls: list[tuple[float, float | None]]) -> list[tuple[float, float]]:
  """The calls during which other processes used at most CONTENDED_FRAC."""
  return [(w, f) for w, f in calls if f is not None and f <= CONTENDED_FRAC]


def _torch_generation_config(new_tokens: int) -> transformers.GenerationConfig:
  # eos_token_id=None: no stopping and no eos-suppressing logits processor
  # (min_new_tokens only masks eos when one is set), so greedy torch is pure
  # argmax like ours and always emits exactly `new_tokens` tokens.
  return transformers.GenerationConfig(
      do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
      eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True)


def bench_model(name: str, new_tokens: int, repeats: int, max_rounds: int,
                seed: int) -> dict:
  """Times ours and torch on one preset; returns its figures."""
  config = PRESETS[name]
  params = dynamo_jax.init_params(config, seed)
  prompt = np.random.default_rng(seed).integers(
      0, config.vocab_size, size=(1, PROMPT_LEN), dtype=np.int32)

  def ours():
    # generate returns numpy tokens, so the call blocks until decoding is done.
    return dynamo_jax.generate(config, params, prompt,
                               max_new_tokens=new_tokens, mode="ar", greedy=True)

  # Torch gets the same weights through an HF directory.
  with tempfile.TemporaryDirectory(prefix="bench_ar_") as tmp:
    hf_dir = os.path.join(tmp, "hf")
    dynamo_jax.to_hf(config, params, hf_dir)
    model = transformers.GPTNeoXForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32)
  model.eval()
  gen_config = _torch_generation_config(new_tokens)
  # from_pretrained derives a generation config from config.json (eos 0), and
  # generate fills our None fields from it; replace it so eos stays off.
  model.generation_config = gen_config
  input_ids = torch.from_numpy(prompt.astype(np.int64))
  attention_mask = torch.ones_like(input_ids)

  def theirs():
    with torch.inference_mode():
      return model.generate(input_ids, attention_mask=attention_mask,
                            generation_config=gen_config)

  start = time.perf_counter()
  ours_tokens = ours().tokens[0]
  ours_first_s = time.perf_counter() - start  # compile + one run
  torch_tokens = theirs()[0, PROMPT_LEN:].numpy()  # warm-up

  # Rounds until both sides have `repeats` clean calls (or max_rounds).
  calls = {"ours": [], "torch": []}  # (wall seconds, other-CPU fraction)
  for _ in range(max_rounds):
    for side, fn in (("ours", ours), ("torch", theirs)):
      calls[side].append(_timed(fn))
    if all(len(_clean(c)) >= repeats for c in calls.values()):
      break
  del model, params

  contended = any(len(_clean(c)) < repeats for c in calls.values())
  # Clean calls whenever both sides have some: contended ones mostly measure
  # the other processes (torch far more than us).
  over = "clean" if all(_clean(c) for c in calls.values()) else "all"
  used = {side: _clean(c) if over == "clean" else c
          for side, c in calls.items()}
  med = {side: statistics.median(w for w, _ in c) for side, c in used.items()}
  med_all = {side: statistics.median(w for w, _ in c)
             for side, c in calls.items()}
  ours_tps = new_tokens / med["ours"]
  torch_tps = new_tokens / med["torch"]
  n = min(len(ours_tokens), len(torch_tokens))
  mismatch = np.nonzero(ours_tokens[:n] != torch_tokens[:n])[0]
  return {
      "num_params": config.num_params(),
      "ours_tok_per_s": round(ours_tps, 2),
      "torch_tok_per_s": round(torch_tps, 2),
      "ratio": round(ours_tps / torch_tps, 3),
      "meets_target": ours_tps / torch_tps >= TARGET_RATIO,
      "ours_median_s": round(med["ours"], 4),
      "torch_median_s": round(med["torch"], 4),
      "ours_compile_plus_first_run_s": round(ours_first_s, 3),
      "ours_tokens_emitted": int(len(ours_tokens)),
      "torch_tokens_emitted": int(len(torch_tokens)),
      "greedy_tokens_match": int(n - len(mismatch)),
      "first_mismatch_index": int(mismatch[0]) if len(mismatch) else None,
      "medians_over": over,
      "contended": contended,
      "clean_calls": {side: len(_clean(c)) for side, c in calls.items()},
      "ratio_all_calls": round(med_all["torch"] / med_all["ours"], 3),
      # Every timed call, clean or not, in order.
      "times_s": {side: [round(w, 4) for w, _ in c]
                  for side, c in calls.items()},
      "other_cpu_frac": {side: [None if f is None else round(f, 3)
                                for _, f in c] for side, c in calls.items()},
  }


def machine() -> dict:
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_devices": [str(d) for d in jax.devices()],
      "torch": torch.__version__,
      "torch_num_threads": torch.get_num_threads(),
      "transformers": transformers.__version__,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+",
                      default=["pythia-70m", "pythia-160m"],
                      choices=sorted(PRESETS))
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--max-rounds", type=int, default=None,
                      help="cap on timing rounds (default 4 * repeats)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  transformers.logging.set_verbosity_error()  # keep stderr readable
  max_rounds = max(args.repeats, args.max_rounds or 4 * args.repeats)
  results = {name: bench_model(name, args.new_tokens, args.repeats, max_rounds,
                               args.seed)
             for name in args.models}
  contended = [n for n, r in results.items() if r["contended"]]
  if contended:
    print(f"warning: fewer than {args.repeats} clean calls for {contended} "
          f"(other processes used > {CONTENDED_FRAC:.0%} of the CPUs); see "
          "medians_over and clean_calls, or rerun on an idle machine.",
          file=sys.stderr)
  print(json.dumps({
      "benchmark": "ar_decode_cpu_batch1_greedy",
      "prompt_len": PROMPT_LEN,
      "new_tokens": args.new_tokens,
      "repeats": args.repeats,
      "max_rounds": max_rounds,
      "statistic": "median",
      "clean_call_max_other_cpu_frac": CONTENDED_FRAC,
      "target_ratio": TARGET_RATIO,
      "models": results,
      "machine": machine(),
  }, indent=2))


if __name__ == "__main__":
  main()
