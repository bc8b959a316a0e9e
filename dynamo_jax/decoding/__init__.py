"""Decoding: KV-cache decode steps, sampling and `generate`."""

from dynamo_jax.decoding.ar import ar_step, generate_ar, pass_keys
from dynamo_jax.decoding.dynamo import (SamplerSettings, decode_step,
                                        generate_dynamo, write_rows)
from dynamo_jax.decoding.generate import GenerateOutput, generate
