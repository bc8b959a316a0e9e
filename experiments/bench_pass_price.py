"""The price of a decoding pass over an AR pass at a suite shape.

Random weights of a DynaMo suite shape (default `dynamo-180m-t3`: pythia-160m
plus two head layers), bf16, batch 1, `--new-tokens` per call, every mode
timed in one process with calls interleaved (evaluation/prices.py: medians
over `--repeats`, ranges, compile excluded). Modes: DynaMo at eps_b 1 (one
token per pass, so the time over AR's is the pass price) with head 1
unembedded exactly (the default) and with `exact_head1=False` (one
unembedding matmul for all heads); the verified chain and a verified tree
(per pass; random heads are rarely accepted). Target (issue: wall-clock
speed): DynaMo <= 1.15x AR at pythia-160m shape.

  python experiments/bench_pass_price.py [--shape dynamo-180m-t3] [--repeats 5]
  python experiments/bench_pass_price.py --dtype float32 --matmul native

`--matmul native` multiplies by the native CPU kernel over packed float32
weights (kernels/cpu_matmul.py) instead of XLA's matmuls.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from dynamo_jax.evaluation import prices
from dynamo_jax.kernels import cpu_matmul
from dynamo_jax.model.config import DYNAMO_PRESETS, dynamo_preset
from dynamo_jax.model.pythia import init_params


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="dynamo-180m-t3",
                 choices=sorted(DYNAMO_PRESETS))
  p.add_argument("--dtype", default="bfloat16",
                 choices=["bfloat16", "float32"])
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--tree", type=int, default=4)
  p.add_argument("--matmul", default="xla", choices=["xla", "native"])
  args = p.parse_args()
  if args.matmul == "native" and args.dtype != "float32":
    p.error("--matmul native multiplies float32 weights; add --dtype float32")
  config = dynamo_preset(args.shape, dtype=args.dtype, param_dtype=args.dtype)
  params = init_params(config, 0)
  if args.matmul == "native":
    config, params = cpu_matmul.pack_params(config, params)
  prompt = np.random.default_rng(0).integers(
      1, config.vocab_size, size=(1, args.prompt_len)).astype(np.int32)
  modes = {
      "dynamo_eps1_exact_head1": dict(mode="dynamo", eps_b=1.0),
      "dynamo_eps1_one_unembed": dict(mode="dynamo", eps_b=1.0,
                                      exact_head1=False),
      "verified_chain": dict(mode="verified"),
      "verified_tree": dict(mode="verified", tree=args.tree,
                            k_tree=max(2, args.tree)),
  }
  out = prices.timed_modes(config, params, prompt, modes,
                           new_tokens=args.new_tokens, repeats=args.repeats)
  print(json.dumps({"shape": args.shape, "dtype": args.dtype,
                    "matmul": args.matmul,
                    "load_1min": os.getloadavg()[0], "modes": out}))


if __name__ == "__main__":
  main()
