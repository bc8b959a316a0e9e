"""`generate`: the user-facing decoding entry point (AR, DynaMo, verified)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dynamo_jax.decoding.ar import generate_ar
from dynamo_jax.decoding.dynamo import SamplerSettings, generate_dynamo
from dynamo_jax.decoding.sampling import row_keys
from dynamo_jax.decoding.verified import generate_verified
from dynamo_jax.errors import InputError
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, check_tokens

MODES = ("ar", "dynamo", "verified")
KERNELS = ("reference", "pallas")


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  tokens: np.ndarray     # int32 [B, max_new_tokens], the new tokens only
  accepted: np.ndarray   # int32 [B, passes], tokens emitted per forward pass
  forward_passes: int    # forward passes of the model, prefill included

  @property
  def tokens_per_pass(self) -> float:
    """Mean over rows of (tokens emitted) / (passes in which the row was
    still decoding); tokens past max_new_tokens in a row's last pass count."""
    active = np.maximum((self.accepted > 0).sum(axis=1), 1)
    return float(np.mean(self.accepted.sum(axis=1) / active))


def _check(config, mode, max_new_tokens, greedy, temperature, eps_b, k,
           seed, batch, cooc, kernel, exact_head1=True):
  if mode not in MODES:
    raise InputError(f"mode {mode!r} unknown; available: {MODES}.")
  if not exact_head1 and mode != "dynamo":
    raise InputError(f"exact_head1=False is a DynaMo-step option; mode "
                     f"{mode!r} keeps head 1 exact (use mode='dynamo').")
  if kernel not in KERNELS:
    raise InputError(f"kernel {kernel!r} unknown; available: {KERNELS}.")
  if kernel != "reference" and mode != "dynamo":
    raise InputError(f"kernel {kernel!r} is DynaMo's sampler kernel; mode "
                     f"{mode!r} does not use it.")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive integer, got "
                     f"{max_new_tokens!r}.")
  if not greedy and not (np.isfinite(temperature) and temperature > 0):
    raise InputError(f"temperature must be > 0 when sampling, got "
                     f"{temperature!r}; use greedy=True for argmax decoding.")
  if not 0.0 <= eps_b <= 1.0:
    raise InputError(f"eps_b must lie in [0, 1], got {eps_b!r}.")
  if mode == "dynamo" and (not isinstance(k, (int, np.integer))
                           or not 1 <= k <= config.vocab_size):
    raise InputError(f"k must be an integer in 1..{config.vocab_size} (the "
                     f"vocabulary), got {k!r}.")
  if mode != "ar" and config.num_token_heads < 2:
    raise InputError(
        f"mode {mode!r} needs a DynaMo model with token heads; this model has "
        "only head 1. Use mode='ar', or add and train heads (add_heads, "
        "python -m dynamo_jax train).")
  if not isinstance(seed, (int, np.integer)):
    if len(seed) != batch:
      raise InputError(f"seed must be an int or one int per row ({batch}), "
                       f"got {len(seed)} seeds.")
  if cooc is not None:
    if mode != "dynamo":
      raise InputError(f"cooc weights DynaMo sampling; mode {mode!r} does not "
                       "use it.")
    check = getattr(cooc, "check_compatible", None)
    if check is not None:
      check(vocab_size=config.vocab_size, num_heads=config.num_token_heads)


def generate(config: PythiaConfig, params: Params, input_ids, *,
             max_new_tokens: int, mode: str = "ar", greedy: bool = False,
             temperature: float = 0.7, eps_b: float = 0.5,
             seed: int | Sequence[int] = 0, cooc=None,
             kernel: str = "reference", k: int = 50, alpha: float = 1.0,
             use_cooc: bool = True, blur: bool = True, otsu: bool = True,
             repetition_penalty: float = 1.1,
             exact_head1: bool = True) -> GenerateOutput:
  """Decodes `max_new_tokens` new tokens after each prompt row.

  input_ids: int [B, P] (numpy or jax), all rows of the same length P.
  mode: "ar" (head 1, one token per pass), "dynamo" (Algorithm 1 of the
    paper: 1..n tokens per pass), or "verified" (heads 2..n draft, head 1
    checks: AR's output distribution, greedy output equal to AR's).
  greedy: argmax instead of sampling at `temperature`.
  eps_b: DynaMo's back-off threshold in [0, 1] (1 is AR, 0 emits n).
  seed: an int, or one int per row (then a row's tokens do not depend on
    the batch it is decoded in).
  cooc: None (no co-occurrence weighting) or a co-occurrence table.
  k, alpha, use_cooc, blur, otsu, repetition_penalty: Algorithm 1's knobs.
  kernel: DynaMo's grid post-processing: "reference" (jnp) or "pallas" (the
    fused kernel: Mosaic on TPU, Triton on GPU, interpreted on CPU).
  exact_head1: mode "dynamo" only; False unembeds all heads in one matmul
    (faster; head 1 then matches AR up to rounding, not bit for bit; see
    `SamplerSettings`).
  """
  prompt = check_tokens(config, input_ids)
  b, p = prompt.shape
  _check(config, mode, max_new_tokens, greedy, temperature, eps_b, k, seed, b,
         cooc, kernel, exact_head1)
  n = config.num_token_heads if mode != "ar" else 1
  # The last fed chunk starts at position P + max_new_tokens - 1 at most.
  if p + max_new_tokens + n - 2 >= config.max_position_embeddings:
    raise InputError(
        f"prompt length {p} + max_new_tokens {max_new_tokens} (+ {n - 1} "
        f"look-ahead) exceeds max_position_embeddings="
        f"{config.max_position_embeddings}; shorten the prompt or ask for "
        "fewer tokens.")
  keys = row_keys(int(seed) if isinstance(seed, (int, np.integer))
                  else list(seed), b)
  temp = jnp.float32(temperature if not greedy else 1.0)
  max_new = int(max_new_tokens)
  if mode == "ar":
    tokens = np.asarray(generate_ar(config, params, prompt, keys, temp,
                                    max_new_tokens=max_new, greedy=bool(greedy)))
    return GenerateOutput(tokens=tokens,
                          accepted=np.ones(tokens.shape, np.int32),
                          forward_passes=max_new)
  if mode == "dynamo":
    settings = SamplerSettings(k=int(k), alpha=float(alpha),
                               use_cooc=bool(use_cooc), blur=bool(blur),
                               otsu=bool(otsu), greedy=bool(greedy),
                               kernel=kernel, exact_head1=bool(exact_head1))
    table = cooc.device_table() if hasattr(cooc, "device_table") else cooc
    tokens, accepted, passes = generate_dynamo(
        config, params, prompt, keys, table, temp, jnp.float32(eps_b),
        jnp.float32(repetition_penalty), max_new_tokens=max_new,
        settings=settings)
  else:
    tokens, accepted, passes = generate_verified(
        config, params, prompt, keys, temp, max_new_tokens=max_new,
        greedy=bool(greedy))
  passes = int(passes)
  return GenerateOutput(tokens=np.asarray(tokens),
                        accepted=np.asarray(accepted)[:, :passes],
                        forward_passes=passes)
