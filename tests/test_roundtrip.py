"""HF -> ours -> HF -> transformers, the native format, and sharded files."""

import os

import jax
import numpy as np
import transformers

import dynamo_jax
from dynamo_jax.convert import hf as hf_convert
from dynamo_jax.convert import native
from tests.conftest import make_hf_model, save_hf, torch_logits

MODEL_TOL = 1e-4


def test_hf_round_trip(tmp_path, rng):
  model = make_hf_model(parallel=False, rotary_pct=1.0)
  config, params = dynamo_jax.from_hf(save_hf(model, tmp_path / "a"))
  dynamo_jax.to_hf(config, params, tmp_path / "b")
  reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "b").eval()
  ids = rng.randint(0, config.vocab_size, size=(2, 17))
  ref = torch_logits(model, ids)
  again = torch_logits(reloaded, ids)
  ours = np.asarray(dynamo_jax.forward(config, params, ids))
  assert np.abs(again - ref).max() <= MODEL_TOL
  assert np.abs(ours - again).max() <= MODEL_TOL
  # float32 weights survive both conversions bit for bit.
  for name, p in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy())


def test_sharded_checkpoints_both_ways(tmp_path, rng, monkeypatch):
  model = make_hf_model()
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  config, params = dynamo_jax.from_hf(str(tmp_path / "sharded"))
  ids = rng.randint(0, config.vocab_size, size=(2, 5))
  ref = torch_logits(model, ids)
  assert np.abs(np.asarray(dynamo_jax.forward(config, params, ids)) - ref).max() <= MODEL_TOL
  # Our writer shards too when tensors exceed the shard size.
  monkeypatch.setattr(hf_convert, "_SHARD_BYTES", 30_000)
  dynamo_jax.to_hf(config, params, tmp_path / "out")
  files = os.listdir(tmp_path / "out")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out")
  assert np.abs(torch_logits(reloaded, ids) - ref).max() <= MODEL_TOL


def test_native_round_trip_is_exact(tmp_path):
  model = make_hf_model()
  src = save_hf(model, tmp_path / "hf")
  config, params = dynamo_jax.from_hf(src)
  native.save(config, params, tmp_path / "nat")
  config2, params2 = native.load(str(tmp_path / "nat"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # The streamed CLI path writes the same tensors.
  native.convert_hf_to_native(src, tmp_path / "nat2", progress=False)
  config3, params3 = native.load(str(tmp_path / "nat2"))
  assert config3 == config
  jax.tree.map(np.testing.assert_array_equal, params, params3)


def test_bf16_checkpoint(tmp_path, rng):
  import torch
  model = make_hf_model().to(dtype=torch.bfloat16)
  src = save_hf(model, tmp_path / "hf")
  config, params = dynamo_jax.from_hf(src)  # upcast to float32 by default
  ids = rng.randint(0, 211, size=(1, 6))
  ref = torch_logits(model.float(), ids)
  assert np.abs(np.asarray(dynamo_jax.forward(config, params, ids)) - ref).max() <= MODEL_TOL


def test_dynamo_heads_survive_to_hf(tmp_path, rng):
  """native DynaMo-T3 -> `convert --to-hf` -> from_hf / convert: bit-exact,
  and transformers still loads OUT as head 1."""
  import torch
  from dynamo_jax import cli
  from dynamo_jax.convert.sources import HEADS_FILE
  model = make_hf_model()
  config, params = dynamo_jax.from_hf(save_hf(model, tmp_path / "hf"))
  config, params = dynamo_jax.add_heads(config, params, 3, rng=1)
  native.save(config, params, tmp_path / "nat")
  assert cli.main(["convert", "--to-hf", str(tmp_path / "nat"),
                   str(tmp_path / "out")]) == 0
  assert HEADS_FILE in os.listdir(tmp_path / "out")

  config2, params2 = dynamo_jax.from_hf(str(tmp_path / "out"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  native.convert_hf_to_native(str(tmp_path / "out"), tmp_path / "nat2",
                              progress=False)
  config3, params3 = native.load(str(tmp_path / "nat2"))
  assert config3 == config
  jax.tree.map(np.testing.assert_array_equal, params, params3)

  ids = rng.randint(0, config.vocab_size, size=(2, 13))
  ours = np.asarray(dynamo_jax.forward(config, params, ids, all_heads=True))
  hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert np.abs(torch_logits(hf, ids) - ours[0]).max() <= MODEL_TOL
  assert np.abs(torch_logits(model, ids) - ours[0]).max() <= MODEL_TOL
  # The documented layout: with head_input="stem", head i is the HF model
  # with its last layer replaced by the GPTNeoXLayer tensors heads.{i}.*.
  from safetensors.numpy import load_file
  heads = load_file(os.path.join(tmp_path / "out", HEADS_FILE))
  for i in (2, 3):
    layer = {k[len(f"heads.{i}."):]: torch.from_numpy(v)
             for k, v in heads.items() if k.startswith(f"heads.{i}.")}
    hf.gpt_neox.layers[-1].load_state_dict(layer)
    assert np.abs(torch_logits(hf, ids) - ours[i - 1]).max() <= MODEL_TOL


def test_head_input_survives_to_hf(tmp_path):
  config, params = dynamo_jax.from_hf(save_hf(make_hf_model(), tmp_path / "hf"))
  config, params = dynamo_jax.add_heads(config.replace(head_input="last"),
                                        params, 2, rng=0)
  dynamo_jax.to_hf(config, params, tmp_path / "out")
  assert hf_convert.read_hf_config(str(tmp_path / "out")) == config


def test_default_model_through_hf_loads_the_same(tmp_path):
  """The shipped DynaMo-T3 -> HF directory -> dynamo_jax.load: same params."""
  from dynamo_jax import cli
  from dynamo_jax.default_model import default_model_dir
  assert cli.main(["convert", "--to-hf", default_model_dir(),
                   str(tmp_path / "out")]) == 0
  ref = dynamo_jax.load()
  got = dynamo_jax.load(str(tmp_path / "out"))
  assert got.config == ref.config and got.config.num_token_heads == 3
  jax.tree.map(np.testing.assert_array_equal, ref.params, got.params)
