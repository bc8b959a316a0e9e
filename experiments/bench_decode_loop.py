"""DynaMo decoding: a fully jitted lax.while_loop (what `generate` runs) vs a
Python loop over the jitted, cache-donating `decode_step` (what a user writes
around the importable step). Same model, prompts, seeds and tokens.

Prints one JSON object: median seconds per call of each over --repeats runs
(compile excluded), tokens per pass, and the ratio. Run:

  python experiments/bench_decode_loop.py [--model DIR] [--new-tokens 64]

Without --model: a random DynaMo-T3 of pythia-70m's shape with eps_b=0
(every pass emits 3 tokens), so the figure isolates loop overhead.
"""

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import dynamo_jax
from dynamo_jax.decoding import SamplerSettings, decode_step, pass_keys, write_rows
from dynamo_jax.decoding.sampling import row_keys


def python_loop(step, config, params, prompt, seeds, max_new, eps_b):
  b, p = prompt.shape
  n = config.num_token_heads
  cache = dynamo_jax.init_cache(config, b, p + max_new + n, all_heads=True)
  keys = row_keys(seeds, b)
  history = jnp.zeros((b, max_new + n), jnp.int32)
  count = jnp.zeros((b,), jnp.int32)
  res, cache = step(params, cache, prompt, jnp.full((b,), p, jnp.int32),
                    pass_keys(keys, 0), history, count, eps_b=eps_b)
  passes = 1
  while True:
    history = write_rows(history, res.tokens_BxN, count)
    count = count + res.m_B
    if int(count.min()) >= max_new:  # one host sync per pass
      break
    res, cache = step(params, cache, res.tokens_BxN, res.m_B,
                      pass_keys(keys, passes), history, count, eps_b=eps_b)
    passes += 1
  return np.asarray(history[:, :max_new]), passes


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--eps-b", type=float, default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.model:
    m = dynamo_jax.load(args.model)
    config, params = m.config, m.params
    eps_b = 0.5 if args.eps_b is None else args.eps_b
  else:
    config = dynamo_jax.preset("pythia-70m", num_token_heads=3)
    params = dynamo_jax.init_params(config, 0)
    eps_b = 0.0 if args.eps_b is None else args.eps_b
  rng = np.random.RandomState(0)
  prompt = jnp.asarray(rng.randint(0, config.vocab_size, (1, 16)), jnp.int32)
  seeds = [7]
  step = jax.jit(functools.partial(decode_step, config,
                                   settings=SamplerSettings(k=50)),
                 donate_argnums=1)

  def run_jitted():
    return dynamo_jax.generate(config, params, prompt, mode="dynamo",
                               max_new_tokens=args.new_tokens, eps_b=eps_b,
                               seed=seeds, cooc=None)

  def run_python():
    return python_loop(step, config, params, prompt, seeds, args.new_tokens,
                       jnp.float32(eps_b))

  ref = run_jitted()
  got, passes = run_python()
  assert np.array_equal(got, ref.tokens), "the two loops disagree"
  timings = {}
  for name, fn in (("while_loop", run_jitted), ("python_loop", run_python)):
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    timings[name] = statistics.median(times)
  print(json.dumps({
      "model": args.model or "random pythia-70m-shaped DynaMo-T3",
      "eps_b": eps_b, "new_tokens": args.new_tokens,
      "forward_passes": ref.forward_passes,
      "tokens_per_pass": ref.tokens_per_pass,
      "while_loop_s": timings["while_loop"],
      "python_loop_s": timings["python_loop"],
      "python_over_while": timings["python_loop"] / timings["while_loop"],
      "machine": {"platform": platform.platform(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind}}))


if __name__ == "__main__":
  main()
