"""Shared fixtures: tiny random GPT-NeoX checkpoints made by transformers itself."""

from __future__ import annotations

import gc
import os
import socket

import jax
import numpy as np
import pytest

# Dimensions are primes where GPT-NeoX allows it, so a wrong transpose or
# reshape cannot hide behind equal sizes. head_dim must be even for rotary.
TINY = dict(vocab_size=211, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=3, intermediate_size=97,
            max_position_embeddings=101)


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true",
                   help="run tests marked slow (network, minutes of CPU)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow") or os.environ.get("DYNAMO_RUN_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow test: opt in with --run-slow or "
                          "DYNAMO_RUN_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def make_hf_model(*, parallel=True, rotary_pct=0.25, seed=0, **overrides):
  """A random transformers GPTNeoXForCausalLM with weights large enough that
  every parameter visibly moves the logits (HF's 0.02 init barely does)."""
  import torch
  import transformers
  cfg = transformers.GPTNeoXConfig(**{**TINY, **overrides},
                                   rotary_pct=rotary_pct,
                                   use_parallel_residual=parallel)
  torch.manual_seed(seed)
  model = transformers.GPTNeoXForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name or "layer_norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0)
                + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def save_hf(model, directory, fmt="safetensors"):
  """Saves like a real checkpoint: safetensors via save_pretrained, or a .bin
  with the tensor names the hub's pytorch_model.bin files use."""
  import torch
  model.save_pretrained(directory)
  if fmt == "bin":
    os.remove(os.path.join(directory, "model.safetensors"))
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v
             for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
  return str(directory)


def torch_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_params(config, seed=0, scale=0.3):
  """Random params (not the 0.02 init) so cached/uncached differences show."""
  from dynamo_jax.model import init_params
  params = init_params(config, seed)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  """The environment of a CPU-only JAX subprocess with `devices` fake
  devices, importing this checkout."""
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture
def rng():
  return np.random.RandomState(0)


@pytest.fixture(scope="session")
def trained_t3():
  """A tiny T3 trained with our trainer on a predictable language: rows
  count upward by a per-row stride modulo 31, so a head can know t+2, t+3."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.model import tiny_config
  from dynamo_jax.training.config import OptimConfig
  from dynamo_jax.training.optimizer import make_optimizer
  from dynamo_jax.training.sharding import make_mesh
  from dynamo_jax.training.step import (init_state, make_train_step,
                                        random_params_fn, state_shardings)
  config = tiny_config(vocab_size=32, hidden_size=32, num_heads=4,
                       intermediate_size=64, num_token_heads=3,
                       max_position_embeddings=128)
  opt = make_optimizer(OptimConfig(lr_base=1e-2, lr_heads_mult=1.0,
                                   warmup_frac=0.02, weight_decay=0.0), 300)
  mesh = make_mesh(1, 1, 1)
  _, shardings = state_shardings(config, opt, mesh)
  state = init_state(random_params_fn(config, 0), opt, shardings)
  step = make_train_step(config, opt, mesh, shardings)
  rng = np.random.RandomState(0)
  for _ in range(300):
    start = rng.randint(0, 31, size=(16, 1))
    stride = rng.randint(1, 4, size=(16, 1))
    tokens = (start + stride * np.arange(48)[None]) % 31
    batch = {"tokens": tokens.astype(np.int32),
             "segment_ids": np.ones((16, 48), np.int32)}
    state, metrics = step(state, batch)
  assert float(metrics["head_loss"][2]) < 0.2, metrics  # heads learned
  return config, jax.tree.map(np.asarray, state["params"])


@pytest.fixture(scope="session")
def t3():
  """A tiny random DynaMo-T3 (prime sizes), shared by the decoding tests."""
  from dynamo_jax.model import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(vocab_size=211, hidden_size=24, num_heads=3,
                       intermediate_size=97, num_token_heads=3,
                       max_position_embeddings=128)
  return config, random_params(config)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Drops jax's compiled programs after every test module. Each XLA CPU
  executable holds ~5 memory mappings until its cache entry goes, and the
  whole suite compiles enough programs in one process to reach the kernel's
  vm.max_map_count (65530), where compiling segfaults."""
  yield
  jax.clear_caches()
  gc.collect()
