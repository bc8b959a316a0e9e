"""The native few-row CPU matmul against XLA's, over a model's weights.

Every layer and unembedding weight of a float32 model (default: the embedded
model; `--shape NAME` for random weights of a DynaMo suite shape), multiplied
in sequence by R activation rows inside a `fori_loop` (as a decode loop
does; the weights do not stay in cache between steps), for R = 1 (AR), 3
(the verified chain, DynaMo after a multi-token step), 9 and 17 (trees of 4
and 8 paths). Per R: XLA's einsum over the standard weights and the kernel
(kernels/cpu_rows.cc) over the packed ones, calls interleaved, medians and
ranges of `--repeats` loops of `--steps` steps, microseconds per step.

  python experiments/bench_rows_matmul.py [--shape dynamo-180m-t3]

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

from dynamo_jax.kernels import cpu_matmul


def loop(product, ws, rows, steps):
  """A jitted loop of `steps` steps, each multiplying `rows` rows by every
  weight in turn; each product feeds the next step's rows."""
  @jax.jit
  def run(x, ws):
    def body(_, x):
      acc = jnp.zeros((rows,), jnp.float32)
      for w in ws:
        k = w.shape[0]
        xin = jnp.resize(x, (rows, k)) if x.shape[1] != k else x
        acc = acc + product(xin, w)[:, :8].sum(-1)
      return x + 1e-6 * acc[:, None]
    return jax.lax.fori_loop(0, steps, body, x)
  return run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default=None,
                 help="a DynaMo suite preset (random float32 weights); "
                      "default: the embedded model")
  p.add_argument("--rows", default="1,3,9,17")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args()
  if args.shape:
    from dynamo_jax.model.config import dynamo_preset  # pylint: disable=import-outside-toplevel
    from dynamo_jax.model.pythia import init_params  # pylint: disable=import-outside-toplevel
    params = init_params(dynamo_preset(args.shape), 0)
  else:
    import dynamo_jax  # pylint: disable=import-outside-toplevel
    params = dynamo_jax.load().params
  ws = [w.astype(jnp.float32) for w in cpu_matmul.dense_weights(params)]
  packed = [cpu_matmul.pack(w) for w in ws]
  xla = lambda x, w: jnp.einsum("rk,kn->rn", x, w)  # noqa: E731
  results = {}
  for rows in [int(r) for r in args.rows.split(",")]:
    x = jnp.ones((rows, ws[0].shape[0]), jnp.float32)
    runs = {"xla": (loop(xla, ws, rows, args.steps), ws),
            "native": (loop(cpu_matmul.rows_matmul, packed, rows, args.steps),
                       packed)}
    times = {name: [] for name in runs}
    for fn, w in runs.values():
      jax.block_until_ready(fn(x, w))  # compile
    for _ in range(args.repeats):
      for name, (fn, w) in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    results[rows] = {name: {"us_per_step": float(np.median(t)),
                            "range": [min(t), max(t)]}
                     for name, t in times.items()}
    results[rows]["native_over_xla"] = (results[rows]["native"]["us_per_step"]
                                        / results[rows]["xla"]["us_per_step"])
  print(json.dumps({
      "model": args.shape or "embedded", "weights": len(ws),
      "weight_mib": sum(w.size for w in ws) * 4 / 2**20,
      "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
      "load_1min": os.getloadavg()[0], "rows": results}))


if __name__ == "__main__":
  main()
