"""AR decode throughput: our jitted decoder vs transformers' PyTorch generate.

Measures tokens/s of plain greedy autoregressive decoding, batch 1, on CPU,
for Pythia-shaped models with random weights. Both sides run the SAME weights:
we draw params with `dynamo_jax.init_params`, write them as an HF directory
with `dynamo_jax.to_hf`, and load that into `GPTNeoXForCausalLM` (float32,
eval, torch's default thread count).

Per model: one warm-up call per side (for us it compiles prefill + scan), then
`--repeats` rounds, each timing one call of ours and one of torch back to back
(interleaved, so a transient load hits both sides alike). Each call decodes
exactly `--new-tokens` tokens after a 16-token random prompt, and
tok/s = new_tokens / wall seconds (prefill included on both sides). We report
medians, the ratio ours/torch from the same run (target 1.5), and how many
greedy tokens agree between the two.

Run it on an otherwise idle machine: torch's OpenMP threads spin-wait at
barriers, so another busy process (e.g. a test run) can slow torch by 10x or
more while barely touching XLA, inflating the ratio. For every timed call we
record the CPU that OTHER processes used meanwhile (from /proc/stat minus our
own rusage), as a fraction of all cores; `max_other_cpu_frac` above ~0.1
means the run was contended and should be repeated.

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

# Runs as a plain script from anywhere; the package lives at the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dynamo_jax  # pylint: disable=wrong-import-position
from dynamo_jax.model.config import PRESETS  # pylint: disable=wrong-import-position

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


def _torch_generation_config(new_tokens: int) -> transformers.GenerationConfig:
  # eos_token_id=None: no stopping and no eos-suppressing logits processor
  # (min_new_tokens only masks eos when one is set), so greedy torch is pure
  # argmax like ours and always emits exactly `new_tokens` tokens.
  return transformers.GenerationConfig(
      do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
      eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True)


def bench_model(name: str, new_tokens: int, repeats: int, seed: int) -> dict:
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

  ours_times, torch_times, other = [], [], []
  for _ in range(repeats):
    for fn, times in ((ours, ours_times), (theirs, torch_times)):
      wall, frac = _timed(fn)
      times.append(wall)
      other.append(frac)
  del model, params

  ours_tps = new_tokens / statistics.median(ours_times)
  torch_tps = new_tokens / statistics.median(torch_times)
  n = min(len(ours_tokens), len(torch_tokens))
  mismatch = np.nonzero(ours_tokens[:n] != torch_tokens[:n])[0]
  other = [f for f in other if f is not None]
  max_other = round(max(other), 3) if other else None
  median_other = round(statistics.median(other), 3) if other else None
  return {
      "num_params": config.num_params(),
      "ours_tok_per_s": round(ours_tps, 2),
      "torch_tok_per_s": round(torch_tps, 2),
      "ratio": round(ours_tps / torch_tps, 3),
      "meets_target": ours_tps / torch_tps >= TARGET_RATIO,
      "ours_times_s": [round(t, 4) for t in ours_times],
      "torch_times_s": [round(t, 4) for t in torch_times],
      "ours_compile_plus_first_run_s": round(ours_first_s, 3),
      "ours_tokens_emitted": int(len(ours_tokens)),
      "torch_tokens_emitted": int(len(torch_tokens)),
      "greedy_tokens_match": int(n - len(mismatch)),
      "first_mismatch_index": int(mismatch[0]) if len(mismatch) else None,
      "median_other_cpu_frac": median_other,
      "max_other_cpu_frac": max_other,
      "contended": max_other is not None and max_other > CONTENDED_FRAC,
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
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  transformers.logging.set_verbosity_error()  # keep stderr readable
  results = {name: bench_model(name, args.new_tokens, args.repeats, args.seed)
             for name in args.models}
  contended = [n for n, r in results.items() if r["contended"]]
  if contended:
    print(f"warning: other processes used > {CONTENDED_FRAC:.0%} of the CPUs "
          f"while timing {contended}; rerun on an idle machine.",
          file=sys.stderr)
  print(json.dumps({
      "benchmark": "ar_decode_cpu_batch1_greedy",
      "prompt_len": PROMPT_LEN,
      "new_tokens": args.new_tokens,
      "repeats": args.repeats,
      "statistic": "median",
      "target_ratio": TARGET_RATIO,
      "models": results,
      "machine": machine(),
  }, indent=2))


if __name__ == "__main__":
  main()
