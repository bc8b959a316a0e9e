"""AR decode throughput: our jitted decoder vs transformers' PyTorch generate.

Measures tokens/s of plain greedy autoregressive decoding, batch 1, on CPU,
for Pythia-shaped models with random weights. Both sides run the SAME weights:
we draw params with `dynamo_jax.init_params`, write them as an HF directory
with `dynamo_jax.to_hf`, and load that into `GPTNeoXForCausalLM` (float32).

Per model and side: one warm-up call (for us it compiles prefill + scan), then
`--repeats` timed calls; each call decodes exactly `--new-tokens` tokens after
a 16-token random prompt, and tok/s = new_tokens / wall seconds (prefill
included on both sides). We report medians, the ratio ours/torch from the same
run (target 1.5), and how many greedy tokens agree between the two.

Run it on an otherwise idle machine: torch's OpenMP threads spin-wait at
barriers, so another busy process (e.g. a test run) can slow torch by 10x or
more while barely touching XLA, inflating the ratio. The 1-minute load
average before and after is recorded, and a warning printed if it is high.

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


def _time_calls(fn, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn; fn must block until done."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


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

  # --- ours ---------------------------------------------------------------
  def ours():
    # generate returns numpy tokens, so the call blocks until decoding is done.
    return dynamo_jax.generate(config, params, prompt,
                               max_new_tokens=new_tokens, mode="ar", greedy=True)

  start = time.perf_counter()
  ours_tokens = ours().tokens[0]
  ours_first_s = time.perf_counter() - start  # compile + one run
  ours_times = _time_calls(ours, repeats)

  # --- torch, same weights via an HF directory ----------------------------
  with tempfile.TemporaryDirectory(prefix="bench_ar_") as tmp:
    hf_dir = os.path.join(tmp, "hf")
    dynamo_jax.to_hf(config, params, hf_dir)
    model = transformers.GPTNeoXForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32)
  model.eval()
  gen_config = _torch_generation_config(new_tokens)
  # from_pretrained derives a generation config from config.json (eos 0);
  # replace it, since generate fills our None fields from it.
  model.generation_config = gen_config
  input_ids = torch.from_numpy(prompt.astype(np.int64))
  attention_mask = torch.ones_like(input_ids)

  def theirs():
    with torch.inference_mode():
      return model.generate(input_ids, attention_mask=attention_mask,
                            generation_config=gen_config)

  torch_tokens = theirs()[0, PROMPT_LEN:].numpy()  # warm-up
  torch_times = _time_calls(theirs, repeats)
  del model
  del params

  ours_med = statistics.median(ours_times)
  torch_med = statistics.median(torch_times)
  n = min(len(ours_tokens), len(torch_tokens))
  match = int(np.sum(ours_tokens[:n] == torch_tokens[:n]))
  mismatch = np.nonzero(ours_tokens[:n] != torch_tokens[:n])[0]
  ours_tps = new_tokens / ours_med
  torch_tps = new_tokens / torch_med
  return {
      "num_params": config.num_params(),
      "ours_tok_per_s": round(ours_tps, 2),
      "torch_tok_per_s": round(torch_tps, 2),
      "ratio": round(ours_tps / torch_tps, 3),
      "meets_target": ours_tps / torch_tps >= TARGET_RATIO,
      "ours_median_s": round(ours_med, 4),
      "torch_median_s": round(torch_med, 4),
      "ours_times_s": [round(t, 4) for t in ours_times],
      "torch_times_s": [round(t, 4) for t in torch_times],
      "ours_compile_plus_first_run_s": round(ours_first_s, 3),
      "ours_tokens_emitted": int(len(ours_tokens)),
      "torch_tokens_emitted": int(len(torch_tokens)),
      "greedy_tokens_match": match,
      "first_mismatch_index": int(mismatch[0]) if len(mismatch) else None,
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

  transformers.logging.set_verbosity_error()  # keep stdout/stderr readable
  load_before = os.getloadavg()[0]
  if load_before > 0.5:
    print(f"warning: 1-min load average is {load_before:.2f}; timings (torch "
          "especially) are unreliable on a busy machine.", file=sys.stderr)
  results = {name: bench_model(name, args.new_tokens, args.repeats, args.seed)
             for name in args.models}
  print(json.dumps({
      "benchmark": "ar_decode_cpu_batch1_greedy",
      "prompt_len": PROMPT_LEN,
      "new_tokens": args.new_tokens,
      "repeats": args.repeats,
      "statistic": "median",
      "target_ratio": TARGET_RATIO,
      "models": results,
      "machine": machine(),
      "loadavg_1min_before_after": [round(load_before, 2),
                                    round(os.getloadavg()[0], 2)],
  }, indent=2))


if __name__ == "__main__":
  main()
