"""`generate`: the user-facing decoding entry point."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.decoding.ar import generate_ar
from dynamo_jax.errors import InputError
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, check_tokens

MODES = ("ar",)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  tokens: np.ndarray     # int32 [B, max_new_tokens], the new tokens only
  accepted: np.ndarray   # int32 [B, passes], tokens emitted per forward pass
  forward_passes: int    # forward passes of the model, prefill included

  @property
  def tokens_per_pass(self) -> float:
    return float(self.accepted.sum(axis=1).mean() / self.forward_passes)


def generate(config: PythiaConfig, params: Params, input_ids, *,
             max_new_tokens: int, mode: str = "ar", greedy: bool = False,
             temperature: float = 0.7, seed: int = 0) -> GenerateOutput:
  """Decodes `max_new_tokens` new tokens after each prompt row.

  input_ids: int [B, P] (numpy or jax), all rows of the same length P.
  mode: "ar", plain autoregressive decoding from head 1.
  greedy: argmax instead of sampling at `temperature`.
  """
  if mode not in MODES:
    raise InputError(f"mode {mode!r} unknown; available: {MODES}.")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive integer, got "
                     f"{max_new_tokens!r}.")
  if not greedy and not temperature > 0:
    raise InputError(f"temperature must be > 0 when sampling, got "
                     f"{temperature!r}; use greedy=True for argmax decoding.")
  prompt = check_tokens(config, input_ids)
  # The last fed token sits at position P + max_new_tokens - 2.
  if prompt.shape[1] + max_new_tokens - 1 > config.max_position_embeddings:
    raise InputError(
        f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
        f"- 1 exceeds max_position_embeddings={config.max_position_embeddings};"
        " shorten the prompt or ask for fewer tokens.")
  tokens = generate_ar(config, params, prompt, jax.random.PRNGKey(seed),
                       jnp.float32(temperature if not greedy else 1.0),
                       max_new_tokens=int(max_new_tokens), greedy=bool(greedy))
  tokens = np.asarray(tokens)
  return GenerateOutput(tokens=tokens,
                        accepted=np.ones(tokens.shape, np.int32),
                        forward_passes=int(max_new_tokens))
