"""Config presets, HF config translation, and the whitelist's errors."""

import json

import jax
import numpy as np
import pytest
import transformers

from dynamo_jax.errors import ConfigError
from dynamo_jax.model import PRESETS, PythiaConfig, param_shapes, preset
from tests.conftest import TINY

# Total parameters of each Pythia model as published by EleutherAI (the
# Pythia paper's model table), an independent reference for our shapes.
PUBLISHED_PARAMS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_match_published_counts(name):
  config = PRESETS[name]
  shapes = param_shapes(config)
  counted = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert counted == config.num_params() == PUBLISHED_PARAMS[name]


def test_preset_matches_transformers_param_count():
  import torch
  config = PRESETS["pythia-160m"]
  with torch.device("meta"):
    model = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**config.to_hf_config()))
  assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_preset_lookup_accepts_hub_ids():
  assert preset("EleutherAI/pythia-410m-deduped") == PRESETS["pythia-410m"]
  with pytest.raises(ConfigError, match="unknown preset"):
    preset("pythia-3b")


def test_hf_config_round_trip_both_rope_spellings():
  legacy = {**TINY, "model_type": "gpt_neox", "rotary_pct": 0.5,
            "rotary_emb_base": 500.0, "use_parallel_residual": False,
            "layer_norm_eps": 1e-6, "architectures": ["GPTNeoXForCausalLM"]}
  ours = PythiaConfig.from_hf_config(legacy)
  assert (ours.rotary_pct, ours.rotary_emb_base, ours.use_parallel_residual,
          ours.layer_norm_eps) == (0.5, 500.0, False, 1e-6)
  # transformers 5 writes rope_parameters; read what it saves.
  saved = transformers.GPTNeoXConfig(**ours.to_hf_config()).to_dict()
  saved = json.loads(json.dumps(saved))
  assert "rope_parameters" in saved or "rotary_pct" in saved
  assert PythiaConfig.from_hf_config(
      transformers.GPTNeoXConfig(**ours.to_hf_config())) == ours
  assert PythiaConfig.from_hf_config(ours.to_hf_config()) == ours


def _hf(**changes):
  return {**TINY, "model_type": "gpt_neox", **changes}


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"sliding_window": 128}, "'sliding_window' is not understood"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"hidden_dropout": 0.1}, "dropout is not implemented"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ({"attention_bias": False}, "attention_bias"),
    ({"hidden_size": 25}, "not divisible"),
    ({"rotary_pct": 0.2}, "odd"),
])
def test_unsupported_config_is_named(changes, match):
  with pytest.raises(ConfigError, match=match):
    PythiaConfig.from_hf_config(_hf(**changes))


def test_missing_required_field():
  hf = _hf()
  del hf["hidden_size"]
  with pytest.raises(ConfigError, match="hidden_size"):
    PythiaConfig.from_hf_config(hf)


def test_config_is_hashable_and_frozen():
  config = PRESETS["pythia-70m"]
  hash(config)
  with pytest.raises(Exception):
    config.hidden_size = 3  # type: ignore[misc]
  assert PythiaConfig.from_dict(config.to_dict()) == config


# ---- training config values (load_config: JSON + key=value overrides) -------

@pytest.mark.parametrize("override,match", [
    # The findings: a negative LR trained (lr logged -0.5), a string
    # LR was a TypeError inside optax.
    ("optim.lr_base=-1", r"optim.lr_base must be a finite number > 0, got -1"),
    ("optim.lr_base=abc", r'optim.lr_base must be a finite number > 0, got "abc"'),
    ("optim.lr_base=NaN", r"optim.lr_base must be .* got NaN"),
    ("optim.lr_base=1e999", r"optim.lr_base must be .* got Infinity"),
    ("optim.lr_base=1" + "0" * 400, r"optim.lr_base must be a finite number"),
    ("optim.lr_base=true", r"optim.lr_base must be .* got true"),
    ("optim.lr_heads_mult=-1", r"optim.lr_heads_mult must be a finite number >= 0"),
    ("optim.lr_stem_from_heads_mult=-0.1", r"lr_stem_from_heads_mult must be"),
    ("optim.warmup_frac=1", r"optim.warmup_frac must be a finite number >= 0 and < 1"),
    ("optim.b1=1", r"optim.b1 must be a finite number >= 0 and < 1"),
    ("optim.b2=-0.5", r"optim.b2 must be"),
    ("optim.eps=0", r"optim.eps must be a finite number > 0"),
    ("optim.weight_decay=-1", r"optim.weight_decay must be a finite number >= 0"),
    ("optim.clip_norm=0", r"optim.clip_norm must be null or a finite number > 0"),
    ("optim.mode=both", r"optim.mode must be one of \['full', 'heads_only'\]"),
    ("optim.head_loss_weights=[1,1]", r"one weight per token head "
     r"\(model.num_token_heads = 3\), got 2"),
    ("optim.head_loss_weights=[0,0,0]", r"must not be all zero"),
    ("optim.head_loss_weights=[1,-1,1]", r"optim.head_loss_weights must be null "
     r"or a list, each item a finite number >= 0"),
    ("optim.head_loss_weights=[1,NaN,1]", r"optim.head_loss_weights must be"),
    ("optim.head_loss_weights=3", r"optim.head_loss_weights must be"),
    ("steps=1.5", r"steps must be an integer in 1..2147483647, got 1.5"),
    ("steps=true", r"steps must be an integer .* got true"),
    ('steps="10"', r'steps must be an integer .* got "10"'),
    ("steps=0", r"steps must be an integer in 1.."),
    ("steps=99999999999", r"steps must be an integer in 1..2147483647"),
    ("seed=-1", r"seed must be an integer in 0..4294967295, got -1"),
    ("seed=4294967296", r"seed must be an integer in 0..4294967295"),
    ("log_every=0", r"log_every must be an integer in 1.."),
    ("keep_checkpoints=0", r"keep_checkpoints must be"),
    ("grad_accum=3", r"global_batch_size 8 is not divisible by grad_accum 3"),
    ("seq_len=3", r"seq_len must lie in 4..128 \(head 3 predicts token t\+3"),
    ("seq_len=129", r"seq_len must lie in 4..128"),
    ("async_checkpoints=1", r"async_checkpoints must be true or false, got 1"),
    ("tokenizer=5", r"tokenizer must be null or a string, got 5"),
    ("mesh.data=0", r"mesh.data must be an integer >= 1, or -1"),
    ("mesh.tensor=-2", r"mesh.tensor must be an integer >= 1, or -1"),
    ("mesh.fsdp=1.0", r"mesh.fsdp must be an integer"),
    ("mesh.data=-1", r"at most one mesh axis may be -1"),
    ("model.dtype=float64", r"model.dtype must be one of \['float32', "
     r"'bfloat16', 'float16'\]"),
    ("model.param_dtype=int8", r"model.param_dtype must be one of"),
    ("model.num_token_heads=0", r"model.num_token_heads must be an integer in 1..8"),
    ("model.num_token_heads=2.0", r"model.num_token_heads must be an integer"),
    ("model.head_init=zeros", r"model.head_init must be one of \['random', 'copy'\]"),
    ("model.head_input=middle", r"model.head_input must be one of \['stem', 'last'\]"),
    ("model.init=scratch", r"model.init must be one of \['hf', 'random'\]"),
    ("model.init=hf", r"model.checkpoint must name the weights"),
    ("model.base=pythia-3b", r"model.base: unknown preset 'pythia-3b'"),
    ("model.checkpoint=5", r"model.checkpoint must be null or a string"),
    ("model.overrides=[1]", r"model.overrides must be an object"),
    ("model.overrides.hidden_size=65", r"model.overrides: hidden_size 65 is not "
     r"divisible by num_heads 4"),
    ("model.overrides.rotary_pct=abc", r"model.overrides.rotary_pct must be a "
     r"finite number"),
    ("model.overrides.vocab_size=true", r"model.overrides.vocab_size must be an "
     r"integer"),
    ("model.overrides.dtype=float16", r"model.overrides.dtype: set model.dtype"),
    ("model.overrides.layers=3", r"unknown config keys "
     r"\['model.overrides.layers'\]"),
    ("model.overrides.layer_norm_eps=0", r"layer_norm_eps must be a finite "
     r"number > 0"),
    ("model.overrides.eos_token_id=264", r"eos_token_id must be None or a "
     r"token id in 0..263"),
    ("data.paths=5", r"data.paths must be a list of file, directory or glob"),
    ("data.paths=[1]", r"data.paths must be a list"),
    ("data.shuffle=yes", r'data.shuffle must be true or false, got "yes"'),
    ("data.one_doc_per_line=0", r"data.one_doc_per_line must be true or false"),
    ("data.prefetch=-1", r"data.prefetch must be an integer in 0.."),
    ("data.eos_id=1.0", r"data.eos_id must be null or an integer"),
    ("data.field=", r"data.field must be a non-empty string"),
    ("data.split=3", r"data.split must be a non-empty string"),
    ("data.source=csv", r"data.source must be one of \['tfds', 'text', "
     r"'jsonl', 'tokens', 'instructions'\]"),
    ("data.token_dtype=int8", r"data.token_dtype must be one of"),
    ("data.fields=x", r"unknown config keys \['data.fields'\]"),
    ("data=5", r"data must be a JSON object, got 5"),
    ("model=null", r"model must be a JSON object, got null"),
    ("seq_len.x=1", r"override seq_len.x: seq_len is not a section"),
])
def test_bad_training_config_values_are_named(override, match):
  from dynamo_jax.training.config import load_config
  with pytest.raises(ConfigError, match=match) as err:
    load_config("tiny-test", [override])
  assert "\n" not in str(err.value)


def test_training_config_edges_that_are_allowed():
  from dynamo_jax.training.config import load_config
  cfg = load_config("tiny-test", [
      "optim.lr_base=1", "optim.clip_norm=null", "optim.warmup_frac=0",
      "optim.head_loss_weights=[1, 0, 0.5]", "mesh.fsdp=1", "mesh.tensor=-1",
      "seed=4294967295", "seq_len=128", "model.overrides.eos_token_id=263"])
  # ints where floats are expected become floats; JSON lists become tuples.
  assert cfg.optim.lr_base == 1.0 and isinstance(cfg.optim.lr_base, float)
  assert cfg.optim.head_loss_weights == (1.0, 0.0, 0.5)
  assert cfg.optim.clip_norm is None and cfg.mesh.tensor == -1
  hash(cfg.optim)  # still a frozen, hashable section


def test_training_config_sections_check_when_constructed():
  from dynamo_jax.training.config import MeshConfig, ModelSpec, OptimConfig
  with pytest.raises(ConfigError, match="optim.lr_base must be"):
    OptimConfig(lr_base=-1e-5)
  with pytest.raises(ConfigError, match="mesh.data must be"):
    MeshConfig(data=True)
  with pytest.raises(ConfigError, match="model.overrides: base 'custom' needs "
                     r"every shape field; add \['vocab_size'"):
    ModelSpec(base="custom", init="random")


def test_config_file_must_be_a_json_object(tmp_path):
  from dynamo_jax.training.config import load_config
  path = tmp_path / "list.json"
  path.write_text("[1, 2]")
  with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
    load_config(str(path))
  with pytest.raises(ConfigError, match="no config"):
    load_config(str(tmp_path))  # a directory is not a config file


@pytest.mark.parametrize("changes,match", [
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a finite number > 0"),
    (dict(rotary_emb_base=float("inf")), "rotary_emb_base must be a finite"),
    (dict(rotary_pct="0.25"), "rotary_pct must lie in"),
    (dict(use_parallel_residual="yes"), "use_parallel_residual must be True"),
    (dict(eos_token_id=211), r"eos_token_id must be None or a token id in 0..210"),
    (dict(bos_token_id=-1), "bos_token_id must be"),
])
def test_pythia_config_value_checks(changes, match):
  with pytest.raises(ConfigError, match=match):
    PythiaConfig.from_dict({**PythiaConfig.from_hf_config(_hf()).to_dict(),
                            **changes})
