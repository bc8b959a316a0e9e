"""Logit and per-module parity with transformers' PyTorch GPT-NeoX.

Tolerances (float32): whole model 1e-4 max abs, single modules 1e-5 max abs.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.model.layers import Attention, DecoderLayer, Mlp
from tests.conftest import make_hf_model, save_hf, torch_logits

MODEL_TOL = 1e-4
MODULE_TOL = 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_logits_match_transformers(tmp_path, rng, fmt, parallel, rotary_pct):
  model = make_hf_model(parallel=parallel, rotary_pct=rotary_pct)
  config, params = dynamo_jax.from_hf(save_hf(model, tmp_path / "hf", fmt))
  assert config.use_parallel_residual == parallel
  assert config.rotary_pct == rotary_pct
  ids = rng.randint(0, config.vocab_size, size=(3, 13))  # batch 3, 13 tokens
  ours = np.asarray(dynamo_jax.forward(config, params, ids))
  ref = torch_logits(model, ids)
  assert ours.dtype == np.float32 and ours.shape == (3, 13, 211)
  assert np.abs(ours - ref).max() <= MODEL_TOL
  # The test is not vacuous: logits differ across positions and models.
  assert np.abs(ref).max() > 1.0


def test_jax_array_input_and_int64(tmp_path, rng):
  model = make_hf_model()
  config, params = dynamo_jax.from_hf(save_hf(model, tmp_path / "hf"))
  ids = rng.randint(0, config.vocab_size, size=(2, 7)).astype(np.int64)
  a = np.asarray(dynamo_jax.forward(config, params, ids))
  b = np.asarray(dynamo_jax.forward(config, params, jnp.asarray(ids, jnp.int32)))
  np.testing.assert_array_equal(a, b)


def _capture(module):
  """Registers a hook storing the module's first input and output."""
  seen = {}

  def hook(_, args, kwargs, output):
    seen["input"] = (args[0] if args else kwargs["hidden_states"]).numpy()
    seen["output"] = (output[0] if isinstance(output, tuple) else output).numpy()
  module.register_forward_hook(hook, with_kwargs=True)
  return seen


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_module_parity(tmp_path, rng, parallel, rotary_pct):
  model = make_hf_model(parallel=parallel, rotary_pct=rotary_pct)
  config, params = dynamo_jax.from_hf(save_hf(model, tmp_path / "hf"))
  layer = model.gpt_neox.layers[1]
  attn, mlp, whole = _capture(layer.attention), _capture(layer.mlp), _capture(layer)
  ids = rng.randint(0, config.vocab_size, size=(2, 11))
  torch_logits(model, ids)
  p = params["layers_1"]
  pos = np.broadcast_to(np.arange(11), (2, 11))

  y, _ = Attention(config).apply({"params": p["attention"]}, attn["input"], pos)
  assert np.abs(np.asarray(y) - attn["output"]).max() <= MODULE_TOL
  y = Mlp(config).apply({"params": p["mlp"]}, mlp["input"])
  assert np.abs(np.asarray(y) - mlp["output"]).max() <= MODULE_TOL
  y, _ = DecoderLayer(config).apply({"params": p}, whole["input"], pos)
  assert np.abs(np.asarray(y) - whole["output"]).max() <= MODULE_TOL


def test_bfloat16_close_to_float32(tmp_path, rng):
  """bf16 params and compute: a coarse check (bf16 has ~3 significant digits)."""
  model = make_hf_model()
  path = save_hf(model, tmp_path / "hf")
  cfg32, p32 = dynamo_jax.from_hf(path)
  cfg16, p16 = dynamo_jax.from_hf(path, dtype="bfloat16")
  assert cfg16.dtype == cfg16.param_dtype == "bfloat16"
  assert str(p16["embed_out"].dtype) == "bfloat16"
  ids = rng.randint(0, cfg32.vocab_size, size=(2, 9))
  a = np.asarray(dynamo_jax.forward(cfg32, p32, ids))
  b = np.asarray(dynamo_jax.forward(cfg16, p16, ids))
  assert b.dtype == np.float32
  # Relative to the logit scale; bf16 rounding of ~2e-3 per op accumulates.
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
