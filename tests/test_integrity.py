"""Damaged weights are refused, naming the tensor and file; nothing is lost
or written half way; every refusal is a one-line DynamoError."""

import errno
import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dynamo_jax
from dynamo_jax import cli
from dynamo_jax.convert import native
from dynamo_jax.convert.sources import HEADS_FILE, TensorSource, resolve
from dynamo_jax.default_model import default_model_dir
from dynamo_jax.errors import CheckpointError, ConfigError
from dynamo_jax.fileio import SafetensorsReader, tensor_sha256
from dynamo_jax.model.config import PythiaConfig
from tests.conftest import make_hf_model, random_params, save_hf

TINY_T3 = PythiaConfig(vocab_size=211, hidden_size=24, num_layers=2,
                       num_heads=3, intermediate_size=97,
                       max_position_embeddings=101, num_token_heads=3)


@pytest.fixture(scope="module")
def nat_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("nat") / "m"
  native.save(TINY_T3, random_params(TINY_T3), out)
  return str(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return save_hf(make_hf_model(), tmp_path_factory.mktemp("hf") / "m")


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _span(path, name):
  """File offsets [start, end) of tensor `name`'s bytes in a safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    start, end = json.loads(f.read(n))[name]["data_offsets"]
  return 8 + n + start, 8 + n + end


def _overwrite(path, name, data: bytes, at=0.5):
  start, end = _span(path, name)
  offset = start + int((end - start - len(data)) * at) // 4 * 4
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _params(directory):
  return os.path.join(directory, native.PARAMS_FILE)


# ---- native checkpoints: checksums and values ------------------------------

def test_native_save_writes_checksums_of_every_tensor(nat_dir):
  with open(os.path.join(nat_dir, native.CHECKSUMS_FILE)) as fh:
    manifest = json.load(fh)
  reader = SafetensorsReader(_params(nat_dir))
  assert manifest["algorithm"] == "sha256"
  assert manifest["tensors"] == {n: tensor_sha256(reader.get(n))
                                 for n in reader.keys()}
  assert any(n.startswith("heads_3/") for n in manifest["tensors"])


@pytest.mark.parametrize("name", ["layers_1/mlp/in_kernel",
                                  "heads_3/attention/qkv_bias"])
def test_flipped_bytes_name_the_tensor(nat_dir, tmp_path, name):
  d = _copy(nat_dir, tmp_path / "m")
  # A finite float32 value (1.5), so only the checksum can tell.
  _overwrite(_params(d), name, np.float32(1.5).tobytes())
  with pytest.raises(CheckpointError) as e:
    native.load(d)
  msg = str(e.value)
  assert f"tensor {name} in {_params(d)} does not match its sha256" in msg
  assert "\n" not in msg


def test_without_checksums_old_checkpoints_load_but_nan_is_refused(
    nat_dir, tmp_path):
  d = _copy(nat_dir, tmp_path / "m")
  os.remove(os.path.join(d, native.CHECKSUMS_FILE))
  config, params = native.load(d)  # checkpoints from before checksums
  assert config == TINY_T3
  _overwrite(_params(d), "heads_2/mlp/out_bias", np.float32(np.nan).tobytes())
  with pytest.raises(CheckpointError,
                     match=r"tensor heads_2/mlp/out_bias in .*params\."
                     r"safetensors holds non-finite values"):
    native.load(d)


def test_add_checksums_upgrades_an_old_checkpoint(nat_dir, tmp_path):
  d = _copy(nat_dir, tmp_path / "m")
  with open(os.path.join(d, native.CHECKSUMS_FILE)) as fh:
    shipped = json.load(fh)
  os.remove(os.path.join(d, native.CHECKSUMS_FILE))
  before = open(_params(d), "rb").read()
  native.add_checksums(d)
  assert open(_params(d), "rb").read() == before
  with open(os.path.join(d, native.CHECKSUMS_FILE)) as fh:
    assert json.load(fh) == shipped


def test_default_model_ships_checksums_of_its_params():
  d = default_model_dir()
  with open(os.path.join(d, native.CHECKSUMS_FILE)) as fh:
    digests = json.load(fh)["tensors"]
  reader = SafetensorsReader(_params(d))
  assert digests == {n: tensor_sha256(reader.get(n)) for n in reader.keys()}



def _edit_json(path, edit):
  """Applies `edit` to the JSON object in `path`, in place."""
  with open(path) as fh:
    obj = json.load(fh)
  edit(obj)
  with open(path, "w") as fh:
    json.dump(obj, fh)

@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(tensors={}), "disagree on which tensors exist"),
    (lambda m: m.update(algorithm="md5"), "cannot read the checksums"),
    (lambda m: m.pop("tensors"), "cannot read the checksums"),
])
def test_damaged_checksums_file(nat_dir, tmp_path, edit, match):
  d = _copy(nat_dir, tmp_path / "m")
  _edit_json(os.path.join(d, native.CHECKSUMS_FILE), edit)
  with pytest.raises(CheckpointError, match=match):
    native.load(d)


def test_generate_on_a_damaged_copy_exits_2(tmp_path, capsys):
  d = _copy(default_model_dir(), tmp_path / "m")
  _overwrite(_params(d), "layers_2/mlp/in_kernel", b"\xff" * 64)
  assert cli.main(["generate", "--model", d, "--prompt", "And", "--json",
                   "--max-new-tokens", "2"]) == 2
  out = capsys.readouterr()
  assert out.out == ""
  assert out.err.startswith("error: tensor layers_2/mlp/in_kernel in ")
  assert out.err.count("\n") == 1


def test_save_refuses_non_finite_params(tmp_path):
  params = random_params(TINY_T3)
  params["heads_3"]["mlp"]["in_bias"] = params["heads_3"]["mlp"]["in_bias"].at[
      3].set(np.inf)
  with pytest.raises(CheckpointError, match=r"param heads_3/mlp/in_bias holds "
                     "non-finite"):
    native.save(TINY_T3, params, tmp_path / "nat")
  with pytest.raises(CheckpointError, match=r"param heads_3/mlp/in_bias holds "
                     "non-finite"):
    dynamo_jax.to_hf(TINY_T3, params, tmp_path / "hf")
  assert os.listdir(tmp_path) == []  # nothing half-written


def test_write_errors_become_checkpoint_errors(tmp_path, monkeypatch):
  def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
  monkeypatch.setattr(native, "write_safetensors", full)
  with pytest.raises(CheckpointError, match=r"cannot write .*nat: No space "
                     r"left on device \(.*params\.safetensors\)"):
    native.save(TINY_T3, random_params(TINY_T3), tmp_path / "nat")
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("edit,error,match", [
    (lambda m: m.update(extra=1), CheckpointError,
     r"unknown top-level keys \['extra'\]"),
    (lambda m: m["model"].update(extra=1), ConfigError,
     r"unknown PythiaConfig fields \['extra'\]"),
    (lambda m: m.pop("model"), CheckpointError, "lacks its \"model\""),
])
def test_dynamo_config_is_whitelisted(nat_dir, tmp_path, edit, error, match):
  d = _copy(nat_dir, tmp_path / "m")
  _edit_json(os.path.join(d, native.CONFIG_FILE), edit)
  with pytest.raises(error, match=match):
    native.load(d)


def test_missing_params_is_called_missing(nat_dir, tmp_path):
  d = _copy(nat_dir, tmp_path / "m")
  os.remove(_params(d))
  with pytest.raises(CheckpointError, match="but no params.safetensors") as e:
    native.load(d)
  assert "corrupt" not in str(e.value)


# ---- HF checkpoints: values, dtypes, damaged files ------------------------

def _hf_copy(hf_dir, dst, edit_tensors):
  os.makedirs(dst)
  shutil.copy(os.path.join(hf_dir, "config.json"), dst)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), {"format": "pt"})
  return str(dst)


def _set(name, fn):
  return lambda t: t.update({name: fn(t[name])})


@pytest.mark.parametrize("edit,match", [
    (_set("gpt_neox.embed_in.weight", lambda w: np.where(
        np.arange(w.size).reshape(w.shape) == 7, np.nan, w).astype(w.dtype)),
     "holds non-finite values"),
    (_set("gpt_neox.embed_in.weight", lambda w: w.astype(np.int32)),
     "has dtype int32, but parameters are floating point"),
])
def test_convert_refuses_bad_values(hf_dir, tmp_path, edit, match):
  src = _hf_copy(hf_dir, tmp_path / "src", edit)
  with pytest.raises(CheckpointError) as e:
    native.convert_hf_to_native(src, tmp_path / "out", progress=False)
  assert str(e.value).startswith("tensor gpt_neox.embed_in.weight in "
                                 f"{os.path.join(src, 'model.safetensors')} ")
  assert match in str(e.value)
  assert not os.path.exists(tmp_path / "out")


def test_overflow_in_the_cast_is_refused(hf_dir, tmp_path):
  src = _hf_copy(hf_dir, tmp_path / "src", _set(
      "gpt_neox.layers.1.mlp.dense_4h_to_h.bias", lambda b: b * 1e6))
  dynamo_jax.from_hf(src)  # finite in float32
  with pytest.raises(CheckpointError, match=r"dense_4h_to_h\.bias in .*, cast "
                     "to float16, holds non-finite"):
    dynamo_jax.from_hf(src, dtype="float16")


def test_truncated_bin_names_the_file(hf_dir, tmp_path):
  src = save_hf(make_hf_model(), tmp_path / "m", fmt="bin")
  path = os.path.join(src, "pytorch_model.bin")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=f"{path} is truncated or corrupt"):
    TensorSource(src)


class _NotWeights:
  pass


def test_pickle_refusal_is_one_clean_line(hf_dir, tmp_path):
  import torch
  d = tmp_path / "m"
  os.makedirs(d)
  shutil.copy(os.path.join(hf_dir, "config.json"), d)
  torch.save({"w": torch.zeros(2), "x": _NotWeights()}, d / "pytorch_model.bin")
  with pytest.raises(CheckpointError) as e:
    dynamo_jax.from_hf(str(d))
  msg = str(e.value)
  assert msg.startswith(f"{d / 'pytorch_model.bin'} is not a plain weights file")
  assert "non-tensor Python objects" in msg and "safety" in msg
  assert "\x1b" not in msg and "\n" not in msg and msg.endswith(".")


def test_heads_file_metadata_is_whitelisted(hf_dir, tmp_path):
  config, params = dynamo_jax.from_hf(hf_dir)
  config, params = dynamo_jax.add_heads(config, params, 2, rng=0)
  dynamo_jax.to_hf(config, params, tmp_path / "out")
  path = os.path.join(tmp_path / "out", HEADS_FILE)
  tensors = load_file(path)
  meta = SafetensorsReader(path).metadata
  save_file(tensors, path, {**meta, "num_token_heads": "9"})
  with pytest.raises(ConfigError, match=f"{path}: num_token_heads must be"):
    dynamo_jax.from_hf(str(tmp_path / "out"))
  save_file(tensors, path, {**meta, "colour": "blue"})
  with pytest.raises(CheckpointError, match=r"metadata keys \['colour'\]"):
    dynamo_jax.from_hf(str(tmp_path / "out"))
  save_file(tensors, path, {**meta, "num_token_heads": "3"})
  with pytest.raises(CheckpointError, match=r"lacks 12 tensor.*heads\.3\."):
    dynamo_jax.from_hf(str(tmp_path / "out"))


# ---- where checkpoints come from -------------------------------------------

def test_missing_local_dir_that_looks_like_a_hub_id(tmp_path, monkeypatch):
  import huggingface_hub as hub

  def offline(*args, **kwargs):
    raise OSError("[Errno -2] Name or service not known")
  monkeypatch.setattr(hub, "model_info", offline)
  monkeypatch.setattr(hub, "list_repo_files", None)  # retries ~25 s offline
  with pytest.raises(CheckpointError, match="no local directory "
                     "'fx/nonexistent_dir' exists.*the hub is unreachable "
                     "and no copy is cached") as e:
    resolve("fx/nonexistent_dir")
  assert "\n" not in str(e.value)
  with pytest.raises(CheckpointError, match="no local directory of that name"):
    resolve(str(tmp_path / "nope"))
  with pytest.raises(CheckpointError, match="is a file, not a checkpoint"):
    resolve(_params(default_model_dir()))
