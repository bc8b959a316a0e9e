"""The floor of a DynaMo and a verified pass: their model part alone, in AR passes.

A DynaMo-Tn pass runs the model with every head and unembeds every head;
a verified chain pass feeds n tokens and unembeds head 1 at each of them and
heads 2..n at one. Whatever the sampler or the verification costs comes on
top. This script measures those model parts alone against a whole AR pass
(`decoding.ar.ar_pass`: model, unembedding and draw) on the embedded model,
so the price it prints is a floor: a mode must emit at least that many
tokens per pass to be no slower than AR even if everything else it does
were free. Compare with the tokens per pass of `python -m dynamo_jax bench`.

Loops, each 64 passes inside one jitted `fori_loop` from a cache prefilled
with a 32-token prompt (one length for every loop, `generate`'s for 64 new
tokens; each call copies it once), calls interleaved in one process,
medians over `--repeats`:
  ar             AR's pass, sampling at T 0.7 (as `bench` times it)
  dynamo_feed_1  DynaMo's model part after a one-token step (every pass at
                 eps_b 1): one token in, every head unembedded at it
                 (`exact_head1`, the default: head 1 in its own matmul
                 with XLA's, all heads in one with the native matmul)
  dynamo_feed_n  the same after an n-token step: n tokens in
  chain          the chain's model part: n tokens in, head 1 unembedded at
                 each, heads 2..n at one of them
The next pass's tokens depend on every logit this pass computes (an argmax
of their sum, a small part of the pass), so nothing is hoisted out of the
loop or cut short.

  python experiments/bench_pass_floor.py [--repeats 14] [--matmul native]

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
from dynamo_jax.model.pythia import forward_cached, init_cache, unembed

PASSES = 64
PROMPT = 32


def _next_tokens(logits, width):
  """[1, width] tokens that depend on every logit (the argmax of their sum
  over rows: XLA would otherwise compute only the logits a cheaper
  function reads), so that no unembedding is cut short."""
  v = logits.shape[-1]
  best = jnp.argmax(logits.reshape(-1, v).sum(0)).astype(jnp.int32)
  return (jnp.arange(width, dtype=jnp.int32)[None] * 7 + best) % 97


def _loop(config, kind: str, n: int):
  def run(params, cache):
    keys = row_keys(0, 1)

    def body(i, state):
      cache, tok = state
      # Every loop's cache has generate's length (prompt + passes + n);
      # a loop that feeds n tokens a pass would outrun it, so its end
      # stops at prompt + passes and it rewrites the last slots from there
      # (attention covers every slot, filled or not: the work is the same).
      cache = {**cache, "end": jnp.minimum(cache["end"], PROMPT + PASSES)}
      if kind == "ar":
        nxt, cache = ar_pass(config, params, cache, tok[:, :1], keys, i,
                             jnp.float32(0.7), greedy=False)
        return cache, jnp.broadcast_to(nxt[:, None], tok.shape)
      if kind.startswith("dynamo"):
        width = 1 if kind == "dynamo_feed_1" else n
        logits, cache = forward_cached(config, params, cache, tok[:, :width],
                                       all_heads=True, last_only=True)
        return cache, _next_tokens(logits, n)
      hidden, cache = forward_cached(config, params, cache, tok,
                                     all_heads=True, hidden_only=True)
      head1 = unembed(config, params, hidden[0])
      # Heads 2..n at a position that depends on head 1 (the chain's j_B).
      j = jnp.argmax(head1[0, :, 0])
      rest = unembed(config, params, hidden[1:, :, j])
      return cache, _next_tokens(
          jnp.concatenate([head1[0], rest[:, 0]]), n)

    tok = jnp.full((1, n), 5, jnp.int32)
    return jax.lax.fori_loop(1, PASSES + 1, body, (cache, tok))[1]

  return jax.jit(run)


def _prefill(config, params, kind: str, n: int):
  """The prompt in a cache of `generate`'s length for P + PASSES tokens
  (the same for every loop); AR's has no head entries, as `generate`
  builds it."""
  prompt = jnp.arange(5, 5 + PROMPT, dtype=jnp.int32)[None]
  heads = kind != "ar"
  cache = init_cache(config, 1, PROMPT + PASSES + n, all_heads=heads)
  _, cache = jax.jit(lambda p, c: forward_cached(
      config, p, c, prompt, all_heads=heads, last_only=True))(params, cache)
  return cache


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
  n = config.num_token_heads
  kinds = ("ar", "dynamo_feed_1", "dynamo_feed_n", "chain")
  runs = {kind: _loop(config, kind, n) for kind in kinds}
  caches = {kind: _prefill(config, params, kind, n) for kind in kinds}
  for kind, fn in runs.items():
    jax.block_until_ready(fn(params, caches[kind]))
  times = {kind: [] for kind in runs}
  for _ in range(args.repeats):
    for kind, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, caches[kind]))
      times[kind].append((time.perf_counter() - start) / PASSES * 1e3)
  ms = {kind: float(np.median(t)) for kind, t in times.items()}
  print(json.dumps({
      "model": "embedded default", "matmul": args.matmul, "heads": n,
      "ms_per_pass": {k: round(v, 4) for k, v in ms.items()},
      "ms_range": {k: [round(min(t), 4), round(max(t), 4)]
                   for k, t in times.items()},
      "floor_price_over_ar": {k: round(ms[k] / ms["ar"], 3)
                              for k in kinds[1:]},
      "load_avg_1min": os.getloadavg()[0],
  }))


if __name__ == "__main__":
  main()
