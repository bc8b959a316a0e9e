"""How much of an AR pass the model's layers take (the embedded model).

A DynaMo-Tn pass runs n - 1 head layers beyond the base model's L layers,
each the same operations as a base layer. If a layer costs the same in both
passes, those head layers alone add (n - 1) / L x f of an AR pass, where f
is the share of AR's pass spent in its L layers. This script measures f:
AR passes (`decoding.ar.ar_pass`: the layers, the final layer norm, the
unembedding and the draw) against the same loop that stops after the layers
(`forward_cached(hidden_only=True)`), each 64 passes inside one jitted
`fori_loop` from the same cache (a 32-token prompt, prefilled once outside
the timed calls; each call copies that cache once, 0.8 MB), calls
interleaved in one process; medians over `--repeats`.

  python experiments/bench_layer_share.py [--repeats 14] [--matmul native]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import dynamo_jax
from dynamo_jax.decoding.ar import ar_pass
from dynamo_jax.decoding.sampling import row_keys
from dynamo_jax.model.pythia import forward_cached, init_cache

PASSES = 64


def _loop(config, kind: str):
  """A jitted run of PASSES passes from a prefilled cache (the prefill is
  done once, outside the timed calls)."""

  def run(params, cache, tok_B):
    keys = row_keys(0, 1)

    def body(i, state):
      cache, tok, acc = state
      if kind == "ar":
        nxt, cache = ar_pass(config, params, cache, tok[:, None], keys, i,
                             jnp.float32(0.7), greedy=False)
        return cache, nxt, acc
      hidden, cache = forward_cached(config, params, cache, tok[:, None],
                                     hidden_only=True)
      # The next token depends on the hidden state, so nothing is hoisted.
      nxt = (tok + (hidden.reshape(-1)[0] > 0).astype(jnp.int32) + 1) % 97
      return cache, nxt, acc + hidden.reshape(-1)[0]

    return jax.lax.fori_loop(1, PASSES + 1, body,
                             (cache, tok_B, jnp.float32(0)))[1:]

  return jax.jit(run)


def _prefill(config, params):
  prompt = jnp.arange(5, 37, dtype=jnp.int32)[None]
  cache = init_cache(config, 1, prompt.shape[1] + PASSES + 1)
  _, cache = jax.jit(lambda p, c: forward_cached(
      config, p, c, prompt, last_only=True))(params, cache)
  return cache, prompt[:, -1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=14)
  p.add_argument("--matmul", default="xla", choices=["xla", "native"])
  args = p.parse_args()
  model = dynamo_jax.load()
  config, params = model.config, model.params
  if args.matmul == "native":
    from dynamo_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
    config, params = cpu_matmul.pack_params(config, params)
  runs = {kind: _loop(config, kind) for kind in ("ar", "layers")}
  cache, tok = _prefill(config, params)
  for fn in runs.values():
    jax.block_until_ready(fn(params, cache, tok))
  times = {kind: [] for kind in runs}
  for _ in range(args.repeats):
    for kind, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, cache, tok))
      times[kind].append((time.perf_counter() - start) / PASSES * 1e3)
  ms = {kind: float(np.median(t)) for kind, t in times.items()}
  heads = config.num_token_heads - 1
  print(json.dumps({
      "model": "embedded default", "matmul": args.matmul,
      "num_layers": config.num_layers, "head_layers": heads,
      "ar_pass_ms": round(ms["ar"], 4), "layers_ms": round(ms["layers"], 4),
      "ar_pass_ms_range": [round(min(times["ar"]), 4),
                           round(max(times["ar"]), 4)],
      "layers_ms_range": [round(min(times["layers"]), 4),
                          round(max(times["layers"]), 4)],
      "layer_share": round(ms["layers"] / ms["ar"], 3),
      "head_layers_cost_in_ar_passes": round(
          heads / config.num_layers * ms["layers"] / ms["ar"], 3),
      "load_avg_1min": os.getloadavg()[0],
  }))


if __name__ == "__main__":
  main()
