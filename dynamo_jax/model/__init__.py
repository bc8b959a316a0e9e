"""The Pythia (GPT-NeoX) model: config, layers, pure forward and KV cache."""

from dynamo_jax.model.config import (DYNAMO_PRESETS, PRESETS, PythiaConfig,
                                     dynamo_preset, preset, tiny_config)
from dynamo_jax.model.heads import add_heads
from dynamo_jax.model.pythia import (Pythia, check_tokens, forward,
                                     forward_cached, init_cache, init_params,
                                     param_axes, param_shapes)
