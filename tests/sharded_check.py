"""Run in a subprocess with 8 fake CPU devices (see test_sharding.py).

Trains a tiny DynaMo-T3 for a few steps on a (data=2, fsdp=2, tensor=2) mesh
and on one device from the same init and batches; prints JSON with the
losses of both, the largest parameter difference, and whether the sharded
step exported for TPU.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dynamo_jax.model import tiny_config  # noqa: E402
from dynamo_jax.training.config import OptimConfig  # noqa: E402
from dynamo_jax.training.optimizer import make_optimizer  # noqa: E402
from dynamo_jax.training.sharding import make_mesh  # noqa: E402
from dynamo_jax.training.step import (init_state, make_train_step,  # noqa: E402
                                      random_params_fn, state_shardings)


def run(mesh, config, opt, batches, grad_accum):
  abstract, shardings = state_shardings(config, opt, mesh)
  state = init_state(random_params_fn(config, 0), opt, shardings)
  init = jax.tree.map(np.asarray, state["params"])
  step = make_train_step(config, opt, mesh, shardings, grad_accum=grad_accum)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(np.asarray(metrics["head_loss"]).tolist())
  final = jax.tree.map(np.asarray, state["params"])
  return losses, init, final, (step, state, batch)


def main():
  steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config(vocab_size=64, hidden_size=32, num_heads=4,
                       intermediate_size=64, num_token_heads=3)
  opt = make_optimizer(OptimConfig(lr_base=1e-3, lr_heads_mult=10.0), 100)
  rng = np.random.RandomState(0)
  batches = [{"tokens": rng.randint(0, 64, size=(8, 16)).astype(np.int32),
              "segment_ids": np.repeat([[1] * 10 + [2] * 6], 8, 0).astype(np.int32)}
             for _ in range(steps)]
  one, init, p_one, _ = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                            config, opt, batches, grad_accum=1)
  eight, _, p_eight, (step, state, batch) = run(make_mesh(2, 2, 2), config, opt,
                                                batches, grad_accum=2)
  maxdiff = lambda x, y: max(jax.tree.leaves(  # noqa: E731
      jax.tree.map(lambda a, b: float(np.abs(a - b).max()), x, y)))
  exported = jax.export.export(step, platforms=["tpu"])(state, batch)
  batch_error = _batch_error()
  print(json.dumps({"losses_one": one, "losses_eight": eight,
                    "max_param_diff": maxdiff(p_one, p_eight),
                    "max_param_moved": maxdiff(p_one, init),
                    "tpu_export_bytes": len(exported.mlir_module_serialized),
                    "tpu_export_shardings": len(exported.in_shardings_hlo),
                    "batch_error": batch_error}))


def _batch_error():
  """The train command's error for a batch the data axes do not divide."""
  from dynamo_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from dynamo_jax.training.config import load_config  # pylint: disable=import-outside-toplevel
  from dynamo_jax.training.loop import train  # pylint: disable=import-outside-toplevel
  cfg = load_config("tiny-test", ["global_batch_size=6", "mesh.data=2",
                                  "mesh.fsdp=2", "mesh.tensor=2",
                                  'data.paths=["/nonexistent"]'])
  try:
    train(cfg, "/tmp/unused-workdir-batch-error")
  except ConfigError as e:
    return str(e)
  return "no error"


if __name__ == "__main__":
  main()
