"""Checkpoint conversion: Hugging Face GPT-NeoX <-> dynamo_jax params."""

from dynamo_jax.convert.hf import from_hf, layout, read_hf_config, to_hf
from dynamo_jax.convert.native import convert_hf_to_native, is_native, load, save
