"""Bad input gets an error naming the problem; nothing half-written is left."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dynamo_jax
from dynamo_jax.convert import native
from dynamo_jax.convert.sources import TensorSource
from dynamo_jax.errors import CheckpointError, ConfigError, InputError
from tests.conftest import make_hf_model, save_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return save_hf(make_hf_model(), tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return dynamo_jax.from_hf(hf_dir)


def _copy(hf_dir, dst, edit_config=None, edit_tensors=None):
  os.makedirs(dst)
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  if edit_config:
    edit_config(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), {"format": "pt"})
  return str(dst)


def test_unsupported_config_field(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path / "m", lambda c: c.update(sliding_window=4))
  with pytest.raises(ConfigError, match="sliding_window"):
    dynamo_jax.from_hf(src)


def test_other_architecture(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path / "m", lambda c: c.update(model_type="llama"))
  with pytest.raises(ConfigError, match="GPT-NeoX"):
    dynamo_jax.from_hf(src)


def test_missing_tensor(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path / "m", edit_tensors=lambda t: t.pop(
      "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
  with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*dense_4h_to_h\.bias"):
    dynamo_jax.from_hf(src)


def test_extra_tensor(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path / "m", edit_tensors=lambda t: t.update(
      {"gpt_neox.layers.2.mlp.dense_4h_to_h.bias": np.zeros(24, np.float32)}))
  with pytest.raises(CheckpointError, match=r"1 tensor.*layers\.2"):
    dynamo_jax.from_hf(src)


def test_old_buffers_are_ignored(hf_dir, tmp_path, rng):
  src = _copy(hf_dir, tmp_path / "m", edit_tensors=lambda t: t.update({
      "gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(1, np.float32),
      "gpt_neox.layers.0.attention.masked_bias": np.ones(1, np.float32)}))
  dynamo_jax.from_hf(src)


def test_wrong_shape(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path / "m", lambda c: c.update(intermediate_size=89))
  with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.weight has shape \(97, 24\).*\(89, 24\)"):
    dynamo_jax.from_hf(src)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors(hf_dir, tmp_path, damage):
  src = _copy(hf_dir, tmp_path / "m")
  path = os.path.join(src, "model.safetensors")
  data = open(path, "rb").read()
  data = {"truncate": data[:len(data) // 2],
          "garbage_header": data[:8] + b"{not json" + data[17:],
          "empty": b""}[damage]
  open(path, "wb").write(data)
  with pytest.raises(CheckpointError, match="corrupt safetensors"):
    dynamo_jax.from_hf(src)


class _NotWeights:
  pass


def test_bin_with_pickled_objects_is_refused(hf_dir, tmp_path):
  import torch
  src = _copy(hf_dir, tmp_path / "m")
  os.remove(os.path.join(src, "model.safetensors"))
  torch.save({"weights": torch.zeros(2), "evil": _NotWeights()},
             os.path.join(src, "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match="not a plain weights file"):
    dynamo_jax.from_hf(src)


def test_no_weights_and_bad_ids(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no weights"):
    TensorSource(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
    dynamo_jax.from_hf(str(tmp_path / "does-not-exist"))


@pytest.mark.parametrize("ids,match", [
    (np.zeros((1, 102), np.int32), "max_position_embeddings=101"),
    (np.zeros((1, 4), np.float32), "integer dtype"),
    (np.array([[1, 211]]), "id 211 outside the vocabulary"),
    (np.array([[-1, 2]]), "id -1 outside"),
    (np.zeros((4,), np.int32), r"shape \[batch, time\]"),
    (np.zeros((1, 0), np.int32), "empty"),
])
def test_bad_input_ids(loaded, ids, match):
  config, params = loaded
  with pytest.raises(InputError, match=match):
    dynamo_jax.forward(config, params, ids)


def test_bad_generate_arguments(loaded):
  config, params = loaded
  ids = np.ones((1, 4), np.int32)
  with pytest.raises(InputError, match="temperature must be > 0"):
    dynamo_jax.generate(config, params, ids, max_new_tokens=3, temperature=0.0)
  with pytest.raises(InputError, match="max_new_tokens"):
    dynamo_jax.generate(config, params, ids, max_new_tokens=0)
  with pytest.raises(InputError, match="exceeds max_position_embeddings"):
    dynamo_jax.generate(config, params, ids, max_new_tokens=99)
  with pytest.raises(InputError, match="mode 'beam' unknown"):
    dynamo_jax.generate(config, params, ids, max_new_tokens=3, mode="beam")


def _listing(parent):
  return sorted(os.listdir(parent))


def test_failed_conversions_leave_nothing(hf_dir, tmp_path, monkeypatch, loaded):
  # Interrupted mid-stream: the source fails on its fifth tensor.
  calls = {"n": 0}
  real_get = TensorSource.get

  def flaky(self, name):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated interrupt")
    return real_get(self, name)
  monkeypatch.setattr(TensorSource, "get", flaky)
  before = _listing(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    native.convert_hf_to_native(hf_dir, tmp_path / "out", progress=False)
  assert _listing(tmp_path) == before  # no OUT, no temporary directory
  monkeypatch.undo()

  # A bad source: OUT is never created.
  bad = _copy(hf_dir, tmp_path / "bad", lambda c: c.update(intermediate_size=89))
  before = _listing(tmp_path)
  with pytest.raises(CheckpointError):
    native.convert_hf_to_native(bad, tmp_path / "out", progress=False)
  assert _listing(tmp_path) == before

  # Writing HF from params that do not match the config.
  config, params = loaded
  broken = {**params, "embed_out": params["embed_out"][:, :5]}
  with pytest.raises(CheckpointError, match="embed_out"):
    dynamo_jax.to_hf(config, broken, tmp_path / "hf_out")
  assert _listing(tmp_path) == before

  # An existing non-empty OUT is refused, not overwritten.
  with pytest.raises(CheckpointError, match="already exists"):
    dynamo_jax.to_hf(config, params, hf_dir)
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors"))
