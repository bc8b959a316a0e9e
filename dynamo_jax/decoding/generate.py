"""`generate`: the user-facing decoding entry point (AR, DynaMo, verified)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.cooc import lookup
from dynamo_jax.cooc.table import CoocTable
from dynamo_jax.decoding.ar import generate_ar
from dynamo_jax.decoding.dynamo import SamplerSettings, generate_dynamo
from dynamo_jax.decoding.sampling import row_keys
from dynamo_jax.decoding.tree import generate_tree
from dynamo_jax.decoding.verified import generate_verified
from dynamo_jax.errors import InputError
from dynamo_jax.kernels import KERNELS
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, check_tokens

MODES = ("ar", "dynamo", "verified")


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


SEED_MAX = 2**32 - 1  # PRNGKey keeps 32 bits: larger or negative seeds alias


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(name: str, value, need: str) -> float:
  """float(value) for a real number (Python or numpy scalar), else InputError."""
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, numbers.Real)
      or (hasattr(value, "dtype") and np.ndim(value) == 0
          and np.dtype(value.dtype).kind in "iuf")):
    raise InputError(f"{name} must be {need}, got {_show(value)}.")
  try:
    return float(value)
  except OverflowError:  # an int beyond float's range
    return math.inf if value > 0 else -math.inf


def _show(value) -> str:
  """repr(value) on one line, cut to a readable length."""
  text = " ".join(repr(value).split())
  return text if len(text) <= 60 else text[:57] + "..."


def _prompt(config: PythiaConfig, input_ids):
  """Validated int32 [B, P]; a ragged list of rows is named as such."""
  if isinstance(input_ids, (list, tuple)):
    lengths = {len(r) for r in input_ids if isinstance(r, (list, tuple))}
    if len(lengths) > 1:
      raise InputError(f"input_ids rows have different lengths "
                       f"{sorted(lengths)}; pad them to one length (and mind "
                       "the padding) or decode them in separate calls.")
    try:
      input_ids = np.asarray(input_ids)
    except (TypeError, ValueError, OverflowError):
      raise InputError("input_ids must be an integer array [batch, time] (a "
                       "list of equal-length rows of token ids).") from None
  return check_tokens(config, input_ids)


def _seed(seed, batch: int):
  """An int, or a list of one int per row, each in 0..SEED_MAX."""
  need = f"an int in 0..{SEED_MAX}, or a list of one int per row ({batch} rows)"
  if _is_int(seed):
    if not 0 <= seed <= SEED_MAX:
      raise InputError(f"seed must be {need}, got {seed!r}.")
    return int(seed)
  if hasattr(seed, "dtype") and hasattr(seed, "shape"):
    seed = np.asarray(seed).tolist() if np.ndim(seed) == 1 else seed
  if not isinstance(seed, (list, tuple)) or not all(
      _is_int(s) and 0 <= s <= SEED_MAX for s in seed):
    raise InputError(f"seed must be {need}, got {_show(seed)}.")
  if len(seed) != batch:
    raise InputError(f"seed must be {need}, got {len(seed)} seeds.")
  return [int(s) for s in seed]


def _check_cooc(config, mode, cooc, tree) -> None:
  if cooc is None:
    return
  # Besides a CoocTable: anything with the sampler's interface (a
  # DeviceTable, a test double with grid_weights(ids, alpha)).
  if not (isinstance(cooc, CoocTable) or hasattr(cooc, "grid_weights")):
    raise InputError(f"cooc must be None or a CoocTable (dynamo_jax.cooc.load,"
                     f" count_ngrams), got {type(cooc).__name__}.")
  if mode != "dynamo" and not tree:
    raise InputError(f"cooc weights DynaMo sampling and tree proposals; mode "
                     f"{mode!r} without a tree does not use it.")
  check = getattr(cooc, "check_compatible", None)
  if check is not None:
    check(vocab_size=config.vocab_size, num_heads=config.num_token_heads)


def _check(config, mode, max_new_tokens, greedy, temperature, eps_b, k,
           cooc, kernel, flags, alpha, repetition_penalty, tree=0, k_tree=8):
  """Checks every decoding argument before anything is traced."""
  if config.weight_layout == "panels":
    from dynamo_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
    cpu_matmul.check_backend()
  if not isinstance(mode, str) or mode not in MODES:
    raise InputError(f"mode {_show(mode)} unknown; available: {MODES}.")
  if not isinstance(kernel, str) or kernel not in KERNELS:
    raise InputError(f"kernel {_show(kernel)} unknown; available: {KERNELS}.")
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise InputError(f"{name} must be True or False, got {_show(value)}.")
  if not flags["exact_head1"] and mode != "dynamo":
    raise InputError(f"exact_head1=False is a DynaMo-step option; mode "
                     f"{mode!r} keeps head 1 exact (use mode='dynamo').")
  if kernel != "reference" and mode != "dynamo":
    raise InputError(f"kernel {kernel!r} is DynaMo's sampler kernel; mode "
                     f"{mode!r} does not use it.")
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive integer, got "
                     f"{_show(max_new_tokens)}.")
  temp = _number("temperature", temperature, "a number")
  if greedy and not 0 <= temp < np.inf:
    raise InputError(f"temperature must be a finite number >= 0 (greedy "
                     f"decoding ignores it), got {temperature!r}.")
  if not greedy and not 0 < temp < np.inf:
    raise InputError(f"temperature must be > 0 and finite when sampling, got "
                     f"{temperature!r}; for argmax decoding use greedy "
                     "decoding (greedy=True / --greedy).")
  if not 0 <= _number("eps_b", eps_b, "a number in [0, 1]") <= 1:
    raise InputError(f"eps_b must lie in [0, 1] (1 is AR), got {eps_b!r}.")
  if not 0 <= _number("alpha", alpha, "a finite number >= 0") < np.inf:
    raise InputError(f"alpha must be a finite number >= 0, got {alpha!r}.")
  if not 1 <= _number("repetition_penalty", repetition_penalty,
                      "a finite number >= 1") < np.inf:
    raise InputError(f"repetition_penalty must be a finite number >= 1 (1 "
                     f"disables it), got {repetition_penalty!r}.")
  if not _is_int(k) or (mode == "dynamo" and not 1 <= k <= config.vocab_size):
    raise InputError(f"k must be an integer in 1..{config.vocab_size} (the "
                     f"vocabulary), got {_show(k)}.")
  if mode != "ar" and config.num_token_heads < 2:
    raise InputError(
        f"mode {mode!r} needs a DynaMo model with token heads; this model has "
        "only head 1. Use mode 'ar' (mode='ar' / --mode ar), or add and train "
        "heads (add_heads, python -m dynamo_jax train).")
  _check_tree(mode, tree, k_tree, config.num_token_heads, config.vocab_size)
  _check_cooc(config, mode, cooc, tree)


def _check_tree(mode, tree, k_tree, n, vocab_size) -> None:
  if not _is_int(tree) or tree < 0:
    raise InputError(f"tree must be an integer >= 0 (candidate paths; 0 "
                     f"verifies one draft chain), got {_show(tree)}.")
  if tree and mode != "verified":
    raise InputError(f"tree={tree} is a verified-mode option (mode='verified'"
                     f" / --mode verified); mode {mode!r} does not use it.")
  if not _is_int(k_tree) or k_tree < 1 or (tree and k_tree > vocab_size):
    raise InputError(f"k_tree must be an integer in 1..{vocab_size} (the "
                     f"vocabulary), got {_show(k_tree)}.")
  if tree and tree > k_tree ** (n - 1):
    raise InputError(f"tree={tree} asks for more paths than the grid has "
                     f"(k_tree^{n - 1} = {k_tree ** (n - 1)}); lower tree or "
                     "raise k_tree.")


def generate(config: PythiaConfig, params: Params, input_ids, *,
             max_new_tokens: int, mode: str = "ar", greedy: bool = False,
             temperature: float = 0.7, eps_b: float = 0.5,
             seed: int | Sequence[int] = 0, cooc=None,
             kernel: str = "reference", k: int = 50, alpha: float = 1.0,
             use_cooc: bool = True, blur: bool = True, otsu: bool = True,
             repetition_penalty: float = 1.1,
             exact_head1: bool = True, tree: int = 0,
             k_tree: int = 8) -> GenerateOutput:
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
  tree: mode "verified" only; 0 verifies one draft chain, T > 0 a tree of
    the T best draft paths (decoding/tree.py; a cooc table, when given,
    weights the paths), taken from each head's top `k_tree` ids; when
    sampling, path 0 is the chain's sampled draft and the other T - 1 the
    best paths.
  """
  prep = prepare(config, input_ids, max_new_tokens=max_new_tokens, mode=mode,
                 greedy=greedy, temperature=temperature, eps_b=eps_b,
                 seed=seed, cooc=cooc, kernel=kernel, k=k, alpha=alpha,
                 use_cooc=use_cooc, blur=blur, otsu=otsu,
                 repetition_penalty=repetition_penalty,
                 exact_head1=exact_head1, tree=tree, k_tree=k_tree)
  max_new = prep.max_new_tokens
  if mode == "ar":
    tokens = np.asarray(generate_ar(config, params, prep.prompt_BxP,
                                    prep.row_keys_Bx2, prep.temperature,
                                    max_new_tokens=max_new, greedy=prep.greedy))
    return GenerateOutput(tokens=tokens,
                          accepted=np.ones(tokens.shape, np.int32),
                          forward_passes=max_new)
  if mode == "dynamo":
    tokens, accepted, passes = generate_dynamo(
        config, params, prep.prompt_BxP, prep.row_keys_Bx2, prep.table,
        prep.temperature, prep.eps_b, prep.repetition_penalty,
        max_new_tokens=max_new, settings=prep.settings)
  elif tree:
    tokens, accepted, passes = generate_tree(
        config, params, prep.prompt_BxP, prep.row_keys_Bx2, prep.temperature,
        prep.table, max_new_tokens=max_new, greedy=prep.greedy,
        paths=prep.tree, k_tree=prep.k_tree, alpha=prep.settings.alpha)
  else:
    tokens, accepted, passes = generate_verified(
        config, params, prep.prompt_BxP, prep.row_keys_Bx2, prep.temperature,
        max_new_tokens=max_new, greedy=prep.greedy)
  passes = int(passes)
  return GenerateOutput(tokens=np.asarray(tokens),
                        accepted=np.asarray(accepted)[:, :passes],
                        forward_passes=passes)


class Prepared(NamedTuple):
  """A checked decoding call, as the jitted decoders take its arguments."""
  prompt_BxP: jax.Array      # int32 [B, P]
  row_keys_Bx2: jax.Array    # uint32 [B, 2], one key per row
  temperature: jax.Array     # float32 [] (1 when greedy: unused)
  eps_b: jax.Array           # float32 []
  repetition_penalty: jax.Array  # float32 []
  table: Any                 # cooc's device view (or test double), or None
  settings: SamplerSettings  # DynaMo's switches (alpha also weights trees)
  max_new_tokens: int
  greedy: bool
  tree: int
  k_tree: int


def max_prompt_length(config: PythiaConfig, mode: str,
                      max_new_tokens: int) -> int:
  """The longest prompt that leaves room for max_new_tokens in `mode` (< 1:
  none does)."""
  n = config.num_token_heads if mode != "ar" else 1
  # The last fed chunk starts at position P + max_new_tokens - 1 at most.
  return config.max_position_embeddings - max_new_tokens - n + 1


def prepare(config: PythiaConfig, input_ids, *, max_new_tokens: int,
            mode: str = "ar", greedy: bool = False, temperature: float = 0.7,
            eps_b: float = 0.5, seed: int | Sequence[int] = 0, cooc=None,
            kernel: str = "reference", k: int = 50, alpha: float = 1.0,
            use_cooc: bool = True, blur: bool = True, otsu: bool = True,
            repetition_penalty: float = 1.1, exact_head1: bool = True,
            tree: int = 0, k_tree: int = 8) -> Prepared:
  """`generate`'s checks and argument conversion (InputError on bad input),
  for callers that run the decoders themselves (dynamo_jax/chat/stream.py)."""
  flags = dict(greedy=greedy, use_cooc=use_cooc, blur=blur, otsu=otsu,
               exact_head1=exact_head1)
  _check(config, mode, max_new_tokens, greedy, temperature, eps_b, k, cooc,
         kernel, flags, alpha, repetition_penalty, tree, k_tree)
  prompt = _prompt(config, input_ids)
  b, p = prompt.shape
  seeds = _seed(seed, b)
  if p > max_prompt_length(config, mode, max_new_tokens):
    n = config.num_token_heads if mode != "ar" else 1
    raise InputError(
        f"prompt length {p} + max_new_tokens {max_new_tokens} (+ {n - 1} "
        f"look-ahead) exceeds max_position_embeddings="
        f"{config.max_position_embeddings}; shorten the prompt or ask for "
        "fewer tokens.")
  settings = SamplerSettings(k=int(k), alpha=float(alpha),
                             use_cooc=bool(use_cooc), blur=bool(blur),
                             otsu=bool(otsu), greedy=bool(greedy),
                             kernel=kernel, exact_head1=bool(exact_head1))
  table = (lookup.device_table(cooc) if isinstance(cooc, CoocTable)
           else cooc)
  return Prepared(prompt_BxP=prompt, row_keys_Bx2=row_keys(seeds, b),
                  temperature=jnp.float32(temperature if not greedy else 1.0),
                  eps_b=jnp.float32(eps_b),
                  repetition_penalty=jnp.float32(repetition_penalty),
                  table=table, settings=settings,
                  max_new_tokens=int(max_new_tokens), greedy=bool(greedy),
                  tree=int(tree), k_tree=int(k_tree))
