"""Decoding: KV-cache decode steps, sampling and `generate`."""

from dynamo_jax.decoding.ar import ar_step, generate_ar
from dynamo_jax.decoding.generate import GenerateOutput, generate
