"""The Pythia (GPT-NeoX) configuration, its presets, and its HF translation.

The package's one shape alphabet. Tensor names carry their shapes
(`x_BxTxD`, `ids_BxNxK`); a letter means the same everywhere. A module may
add letters of its own in its docstring (e.g. the kernel's padded layout)
but never gives one of these another meaning.
  B   batch rows                      V   vocabulary size
  T   tokens fed in this call         S   key / KV-cache length (slots)
  D   hidden size                     F   MLP hidden size
  H   attention heads                 Dh  head dim (D / H)
  L   decoder layers                  N   token heads (DynaMo-Tn: n)
  M   order of one grid (m <= N)      K   top-k ids per head
  E   grid entries, K^M               R   grid rows, K^(M-1)
  P   prompt length                   G   new tokens generated
  Np  forward passes                  Hs  history length (penalty)
  W   scoring window (perplexity)     X   a generic length (helpers)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from dynamo_jax.errors import ConfigError

_ACTIVATIONS = {
    # HF name -> ours. "gelu" is the exact (erf) GELU that Pythia uses.
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
DTYPES = ("float32", "bfloat16", "float16")
HEAD_INPUTS = ("stem", "last")
WEIGHT_LAYOUTS = ("standard", "panels")


@dataclasses.dataclass(frozen=True)
class PythiaConfig:
  """Hyper-parameters of a GPT-NeoX decoder. Frozen and hashable (a jit static arg)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 2048
  rotary_pct: float = 0.25
  rotary_emb_base: float = 10000.0
  layer_norm_eps: float = 1e-5
  use_parallel_residual: bool = True
  hidden_act: str = "gelu"  # "gelu" (erf) or "gelu_tanh"
  bos_token_id: int | None = 0
  eos_token_id: int | None = 0
  # Compute dtype of activations and matmuls; logits, softmax and layer norm
  # statistics are always float32.
  dtype: str = "float32"
  # Storage dtype of parameters.
  param_dtype: str = "float32"
  # DynaMo: token heads (1 = plain Pythia). Heads 2..N are extra decoder
  # layers reading `head_input`: "stem" (input of layer L, the paper's
  # design) or "last" (output of layer L, the paper's ablation).
  num_token_heads: int = 1
  head_input: str = "stem"
  # How the layer and unembedding weights are stored: "standard" (as
  # declared) or "panels" (decode-time copy for the native CPU matmul, made
  # by dynamo_jax.kernels.cpu_matmul.pack_params; never saved).
  weight_layout: str = "standard"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "intermediate_size", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads "
          f"{self.num_heads}.")
    if not _is_real(self.rotary_pct) or not 0.0 <= self.rotary_pct <= 1.0:
      raise ConfigError(f"rotary_pct must lie in [0, 1], got {self.rotary_pct!r}.")
    for name in ("rotary_emb_base", "layer_norm_eps"):
      value = getattr(self, name)
      if not _is_real(value) or not 0.0 < value or not _finite(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}.")
    if not isinstance(self.use_parallel_residual, bool):
      raise ConfigError(f"use_parallel_residual must be True or False, got "
                        f"{self.use_parallel_residual!r}.")
    for name in ("bos_token_id", "eos_token_id"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(
          value, bool) or not 0 <= value < self.vocab_size):
        raise ConfigError(f"{name} must be None or a token id in "
                          f"0..{self.vocab_size - 1} (the vocabulary), got "
                          f"{value!r}.")
    if self.rotary_dim % 2:
      raise ConfigError(
          f"rotary dims int(head_dim * rotary_pct) = {self.rotary_dim} is odd "
          f"(head_dim {self.head_dim}, rotary_pct {self.rotary_pct}); rotary "
          "embeddings rotate pairs of dims, so pick values giving an even count.")
    if self.hidden_act not in ("gelu", "gelu_tanh"):
      raise ConfigError(
          f"hidden_act {self.hidden_act!r} unknown; use 'gelu' or 'gelu_tanh'.")
    if not isinstance(self.num_token_heads, int) or not 1 <= self.num_token_heads <= 8:
      raise ConfigError(f"num_token_heads must be an integer in 1..8, got "
                        f"{self.num_token_heads!r}.")
    if self.head_input not in HEAD_INPUTS:
      raise ConfigError(f"head_input must be 'stem' or 'last', got "
                        f"{self.head_input!r}.")
    if self.weight_layout not in WEIGHT_LAYOUTS:
      raise ConfigError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got "
                        f"{self.weight_layout!r}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name} must be one of {DTYPES}, got "
                          f"{getattr(self, name)!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    # Same truncation as GPT-NeoX: int(head_dim * rotary_pct).
    return int(self.head_dim * self.rotary_pct)

  def replace(self, **changes) -> "PythiaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (token heads included), from the shapes alone."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    layers = self.num_layers + self.num_token_heads - 1
    return 2 * v * d + 2 * d + layers * layer_params(d, f)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PythiaConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError(
          f"unknown PythiaConfig fields {unknown}; known fields: {sorted(fields)}.")
    return cls(**d)

  # ---- Hugging Face translation -------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any] | Any) -> "PythiaConfig":
    """Reads an HF GPT-NeoX config (a config.json dict or a transformers config).

    Every field is checked against a whitelist; a field or value that this
    package cannot represent exactly raises ConfigError naming it.
    """
    if not isinstance(hf, Mapping):
      hf = hf.to_diff_dict() if hasattr(hf, "to_diff_dict") else None
      if hf is None:
        raise ConfigError("from_hf_config takes a config.json dict or a "
                          "transformers.GPTNeoXConfig.")
    return cls(**_translate_hf(dict(hf)))

  def to_hf_config(self) -> dict[str, Any]:
    """The config.json dict transformers reads as a GPTNeoXConfig.

    For a DynaMo model this describes head 1 alone (the base Pythia).
    """
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[self.hidden_act]
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "rotary_pct": self.rotary_pct,
        "rotary_emb_base": self.rotary_emb_base,
        "layer_norm_eps": self.layer_norm_eps,
        "use_parallel_residual": self.use_parallel_residual,
        "hidden_act": act,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "torch_dtype": self.param_dtype,
    }


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond float's range, 10**400
    return False


def layer_params(d: int, f: int) -> int:
  """Parameters of one GPT-NeoX decoder layer (QKV, out-proj, MLP, 2 LayerNorms)."""
  return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d


# Fields copied into PythiaConfig: HF name -> ours.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_pct": "rotary_pct",
    "rotary_emb_base": "rotary_emb_base",
    "rope_theta": "rotary_emb_base",
    "partial_rotary_factor": "rotary_pct",
    "layer_norm_eps": "layer_norm_eps",
    "use_parallel_residual": "use_parallel_residual",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size")
# Fields that do not change the function the model computes.
_HF_METADATA = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "_name_or_path", "is_decoder",
    "classifier_dropout", "tokenizer_class", "gradient_checkpointing",
    "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation_autoset", "model_type", "architectures",
})
# Fields accepted only with exactly the value our model implements.
_HF_FIXED = {
    "tie_word_embeddings": (False, "the output embedding must be untied "
                            "(embed_out), as in every Pythia"),
    "attention_bias": (True, "GPT-NeoX attention projections have biases"),
    "attention_dropout": (0.0, "dropout is not implemented; set it to 0.0"),
    "hidden_dropout": (0.0, "dropout is not implemented; set it to 0.0"),
    "rope_scaling": (None, "only plain rotary embeddings are implemented"),
    "head_dim": (None, "head_dim must equal hidden_size / num_attention_heads"),
}


def _translate_hf(hf: dict[str, Any]) -> dict[str, Any]:
  model_type = hf.get("model_type")
  if model_type != "gpt_neox":
    raise ConfigError(
        f"model_type is {model_type!r}; dynamo_jax ports GPT-NeoX (Pythia) "
        "models only (model_type 'gpt_neox').")
  archs = hf.get("architectures")
  if archs is not None and list(archs) != ["GPTNeoXForCausalLM"]:
    raise ConfigError(f"architectures {archs} unsupported; expected "
                      "['GPTNeoXForCausalLM'].")
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise ConfigError(f"config.json lacks required fields {missing}.")

  hf = dict(hf)
  rope = hf.pop("rope_parameters", None)
  if rope is not None:
    rope = dict(rope)
    rope_type = rope.pop("rope_type", "default")
    if rope_type != "default":
      raise ConfigError(f"rope_parameters.rope_type {rope_type!r} unsupported; "
                        "only 'default' rotary embeddings are implemented.")
    for key in list(rope):
      if key not in ("rope_theta", "partial_rotary_factor"):
        raise ConfigError(f"rope_parameters.{key} is not understood.")
      if key in hf and hf[key] != rope[key]:
        raise ConfigError(f"rope_parameters.{key} conflicts with {key}.")
      hf[key] = rope[key]

  out: dict[str, Any] = {}
  for key, value in hf.items():
    if key in _HF_FIELDS:
      ours = _HF_FIELDS[key]
      if ours in out and out[ours] != value:
        raise ConfigError(f"{key}={value!r} conflicts with another field "
                          f"setting {ours}={out[ours]!r}.")
      out[ours] = value
    elif key == "hidden_act":
      if value not in _ACTIVATIONS:
        raise ConfigError(f"hidden_act {value!r} unsupported; supported: "
                          f"{sorted(_ACTIVATIONS)}.")
      out["hidden_act"] = _ACTIVATIONS[value]
    elif key in _HF_FIXED:
      expected, why = _HF_FIXED[key]
      if key == "head_dim" and value is not None:
        expected = hf["hidden_size"] // hf["num_attention_heads"]
      if value != expected:
        raise ConfigError(f"{key}={value!r} unsupported: {why}.")
    elif key in _HF_METADATA:
      continue
    else:
      raise ConfigError(
          f"config field {key!r} is not understood by dynamo_jax's GPT-NeoX "
          "port; remove it if it does not change the model, or file an issue.")
  if isinstance(out.get("eos_token_id"), (list, tuple)):
    raise ConfigError("a list of eos_token_id values is unsupported.")
  for key in ("rotary_pct", "rotary_emb_base", "layer_norm_eps"):
    if key in out:
      out[key] = float(out[key])
  return out


def _pythia(layers, hidden, heads, vocab=50304) -> PythiaConfig:
  return PythiaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                      num_heads=heads, intermediate_size=4 * hidden)


# Shapes of the public Pythia suite (and its -deduped twins, same shapes).
PRESETS: dict[str, PythiaConfig] = {
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "pythia-1b": _pythia(16, 2048, 8),
    "pythia-1.4b": _pythia(24, 2048, 16),
    "pythia-2.8b": _pythia(32, 2560, 32),
    "pythia-6.9b": _pythia(32, 4096, 32, vocab=50432),
    "pythia-12b": _pythia(36, 5120, 40, vocab=50688),
}


def preset(name: str, **changes) -> PythiaConfig:
  """A Pythia preset by name ('pythia-70m', ...), optionally with changes."""
  key = name.split("/")[-1].replace("-deduped", "").lower()
  if key not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}.")
  return PRESETS[key].replace(**changes)


# The paper's DynaMo suite: Pythia base + 2 extra token heads (T3).
DYNAMO_PRESETS: dict[str, str] = {
    "dynamo-77m-t3": "pythia-70m",
    "dynamo-180m-t3": "pythia-160m",
    "dynamo-430m-t3": "pythia-410m",
    "dynamo-1.1b-t3": "pythia-1b",
    "dynamo-1.5b-t3": "pythia-1.4b",
    "dynamo-2.9b-t3": "pythia-2.8b",
    "dynamo-7.3b-t3": "pythia-6.9b",
}


def dynamo_preset(name: str, **changes) -> PythiaConfig:
  """A DynaMo suite preset by name ('DynaMo-77M-T3', ...)."""
  key = name.lower()
  if key not in DYNAMO_PRESETS:
    raise ConfigError(f"unknown DynaMo preset {name!r}; known: "
                      f"{sorted(DYNAMO_PRESETS)}.")
  return preset(DYNAMO_PRESETS[key], num_token_heads=3, **changes)


def tiny_config(**changes) -> PythiaConfig:
  """A small randomly-initialisable Pythia for tests and smoke runs."""
  base = PythiaConfig(vocab_size=512, hidden_size=64, num_layers=2,
                      num_heads=4, intermediate_size=256,
                      max_position_embeddings=256)
  return base.replace(**changes)

