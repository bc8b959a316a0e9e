"""Training throughput (tokens/s) and MFU of the jitted DynaMo train step.

Prints one JSON object. Synthetic token batches (the data pipeline is not
timed); the step is the one `python -m dynamo_jax train` runs: both
gradients (head 1's, heads 2..n's), three AdamW updates, donated state.

  # CPU: the tiny config, and the sharded 8-fake-device step vs 1 device
  python experiments/bench_train.py --preset tiny --sharded-ratio
  # GPU: the paper's suite shapes at sequence length 2048 in bf16
  python experiments/bench_train.py --preset dynamo-430m-t3 --batch 8
  python experiments/bench_train.py --preset dynamo-1.1b-t3 --batch 4

MFU counts model FLOPs only: 6 x (parameters touched per token) + attention
(6 x 2 x layers x T x D per token, causal counted in full as is usual),
divided by step time and the device's peak dense bf16 FLOP/s. The second
backward pass through the stem that the three-learning-rate update needs
(g1 and g2 are separate gradients) is real work that MFU does not credit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

def model_flops_per_token(config, seq_len: int) -> float:
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  layer = 4 * d * d + 2 * d * f  # matmul weights of one decoder layer
  n = config.num_token_heads
  # Stem + head 1 + (n-1) head layers, and the unembedding once per head.
  matmul = (config.num_layers + n - 1) * layer + n * d * v
  attention = 2 * 2 * seq_len * d * (config.num_layers + n - 1)
  return 3 * (2 * matmul + attention)


def bench(preset: str, batch: int, seq_len: int, steps: int, mesh_shape,
          dtype: str) -> dict:
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from dynamo_jax.evaluation.hardware import peak_bf16_flops
  from dynamo_jax.model import dynamo_preset, tiny_config
  from dynamo_jax.training.config import OptimConfig
  from dynamo_jax.training.optimizer import make_optimizer
  from dynamo_jax.training.sharding import make_mesh
  from dynamo_jax.training.step import (init_state, make_train_step,
                                        random_params_fn, state_shardings)
  if preset == "tiny":
    config = tiny_config(vocab_size=264, hidden_size=64, num_layers=2,
                         num_heads=4, intermediate_size=256,
                         max_position_embeddings=max(128, seq_len),
                         num_token_heads=3)
  else:
    config = dynamo_preset(preset)
  config = config.replace(dtype=dtype, param_dtype="float32")
  opt = make_optimizer(OptimConfig(lr_base=1e-5), 1000)
  mesh = make_mesh(*mesh_shape)
  _, shardings = state_shardings(config, opt, mesh)
  state = init_state(random_params_fn(config, 0), opt, shardings)
  step = make_train_step(config, opt, mesh, shardings)
  rng = np.random.RandomState(0)
  batch_data = {"tokens": rng.randint(0, config.vocab_size, (batch, seq_len),
                                      dtype=np.int32),
                "segment_ids": np.ones((batch, seq_len), np.int32)}
  state, metrics = step(state, batch_data)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch_data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  tokens_per_sec = batch * seq_len / median
  peak = peak_bf16_flops(jax.devices()[0].device_kind)
  flops = model_flops_per_token(config, seq_len) * tokens_per_sec
  return {
      "preset": preset, "batch": batch, "seq_len": seq_len, "dtype": dtype,
      "mesh": dict(mesh.shape), "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "params": config.num_params(), "step_seconds_median": median,
      "step_seconds_all": times, "tokens_per_sec": tokens_per_sec,
      "model_tflops_per_sec": flops / 1e12,
      "mfu": None if peak is None else flops / (peak * jax.device_count()),
  }


def _in_subprocess(args: list[str], devices: int) -> dict:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
  parser.add_argument("--dtype", default=None)
  parser.add_argument("--sharded-ratio", action="store_true",
                      help="also time the (2,2,2) step on 8 fake CPU devices "
                      "against 1 device, each in its own process")
  args = parser.parse_args()
  seq_len = args.seq_len or (64 if args.preset == "tiny" else 2048)
  dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
  result = {"machine": {"platform": platform.platform(),
                        "processor": platform.processor(),
                        "cpus": os.cpu_count()}}
  if args.sharded_ratio:
    common = ["--preset", args.preset, "--batch", str(args.batch), "--seq-len",
              str(seq_len), "--steps", str(args.steps), "--dtype", dtype]
    one = _in_subprocess(common + ["--mesh", "1,1,1"], 1)
    eight = _in_subprocess(common + ["--mesh", "2,2,2"], 8)
    result.update(one_device=one, eight_fake_devices=eight,
                  sharded_over_one_step_time=eight["step_seconds_median"]
                  / one["step_seconds_median"])
  else:
    mesh = tuple(int(x) for x in args.mesh.split(","))
    result.update(bench(args.preset, args.batch, seq_len, args.steps, mesh,
                        dtype))
  import jax  # pylint: disable=import-outside-toplevel
  result["jax"] = jax.__version__
  print(json.dumps(result))


if __name__ == "__main__":
  main()
