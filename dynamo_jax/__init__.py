"""dynamo_jax: DynaMo multi-token prediction on Pythia, in JAX/Flax.

Public API:
  from_hf(path_or_id, *, revision=None, dtype=None) -> (config, params)
  to_hf(config, params, out_dir)
  forward(config, params, input_ids, all_heads=False) -> logits float32
      [B, T, V] (head 1), or [N, B, T, V] for all DynaMo token heads
  add_heads(config, params, n, *, rng, init="random") -> (config, params)
  generate(config, params, input_ids, *, max_new_tokens, mode="ar"|"dynamo"|
      "verified", greedy=False, temperature=0.7, eps_b=0.5, seed=0, cooc=None,
      kernel="reference") -> GenerateOutput(tokens, accepted, forward_passes)
  decode_step(config, params, cache, tokens_BxT, lengths_B, keys_Bx2,
      history_BxHs, history_len_B, cooc=None, ...) -> (SampleResult, cache)
  load(path_or_id=None) -> Model(config, params, tokenizer, cooc)
"""

from dynamo_jax.convert import from_hf, to_hf
from dynamo_jax.convert.native import load as load_native
from dynamo_jax.convert.native import save as save_native
from dynamo_jax.api import Model, load
from dynamo_jax.decoding import GenerateOutput, generate
from dynamo_jax.decoding.dynamo import SamplerSettings, decode_step
from dynamo_jax.errors import CheckpointError, ConfigError, DynamoError, InputError
from dynamo_jax.model import (DYNAMO_PRESETS, PRESETS, PythiaConfig, add_heads,
                              dynamo_preset, forward, forward_cached,
                              init_cache, init_params, param_axes, preset,
                              tiny_config)

__version__ = "0.1.0"
