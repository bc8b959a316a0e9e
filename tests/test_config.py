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
