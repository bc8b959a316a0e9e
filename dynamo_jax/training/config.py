"""Typed, frozen training configs, loaded from JSON with key=value overrides.

A config file (experiments/configs/NAME.json) holds the sections below; a
key it omits takes the default here, an unknown key is an error naming it.
Every value is checked when a section is built (`__post_init__`), before any
work starts: its type from the field's annotation (ints are ints, not bools
or floats; floats are finite numbers, ints allowed; `X | None` also takes
null), its range from the field's `rule`. A bad value is a one-line
ConfigError naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import operator
import os
import types
import typing
from typing import Any, Mapping

from dynamo_jax.data import DataConfig
from dynamo_jax.errors import ConfigError
from dynamo_jax.errors import show_value as _show
from dynamo_jax.model.config import (DTYPES, HEAD_INPUTS, PythiaConfig,
                                     preset)
from dynamo_jax.model.heads import HEAD_INITS

# Named configs: $DYNAMO_CONFIG_DIR, else the source checkout's (editable install).
CONFIG_DIR = os.environ.get("DYNAMO_CONFIG_DIR") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs"))
INT_MAX = 2**31 - 1   # steps and sizes become int32 on the device
SEED_MAX = 2**32 - 1  # PRNGKey keeps 32 bits: larger or negative seeds alias


def _field(default=dataclasses.MISSING, *, factory=dataclasses.MISSING,
           **rule):
  """A dataclass field with a range rule for `_check_fields`: ge/gt/le/lt
  bounds, `choices`, or `ok` (a predicate) with `text` (what it allows)."""
  return dataclasses.field(default=default, default_factory=factory,
                           metadata={"rule": rule})


# ---- the generic check: annotation -> type, rule -> range -------------------

@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _check_fields(obj, where: str) -> None:
  """Checks (and normalises: int -> float, list -> tuple) every field."""
  hints = _hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    checked = _check_value(where + f.name, value, hints[f.name],
                           f.metadata.get("rule", {}))
    if checked is not value:
      object.__setattr__(obj, f.name, checked)


def _check_value(key: str, value: Any, hint: Any, rule: Mapping[str, Any]):
  """`value` if it fits `hint` and `rule` (normalised), else ConfigError."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
      return None
    if len(inner) == 1 and not _fits(value, inner[0], rule):
      raise ConfigError(f"{key} must be null or {_allowed(inner[0], rule)}, "
                        f"got {_show(value)}.")
    return _normalise(value, inner[0])
  if not _fits(value, hint, rule):
    raise ConfigError(f"{key} must be {_allowed(hint, rule)}, got "
                      f"{_show(value)}.")
  return _normalise(value, hint)


def _fits(value: Any, hint: Any, rule: Mapping[str, Any]) -> bool:
  origin = typing.get_origin(hint)
  if origin is tuple:
    return (isinstance(value, (list, tuple))
            and all(_fits(v, typing.get_args(hint)[0], rule) for v in value))
  if origin is not None and issubclass(origin, Mapping):
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
  if dataclasses.is_dataclass(hint):
    return isinstance(value, hint)
  return _SCALARS[hint](value) and _in_range(value, rule)


# Annotation -> its type check. bool is an int in Python, not in a config.
_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    float: lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)
                      and _finite(v)),
}


def _finite(value: numbers.Real) -> bool:
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond float's range, 10**400
    return False


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt),
           ("le", "<=", operator.le), ("lt", "<", operator.lt))


def _in_range(value: Any, rule: Mapping[str, Any]) -> bool:
  return (all(op(value, rule[k]) for k, _, op in _BOUNDS if k in rule)
          and ("choices" not in rule or value in rule["choices"])
          and ("ok" not in rule or rule["ok"](value)))


def _allowed(hint: Any, rule: Mapping[str, Any]) -> str:
  """What `hint` and `rule` allow, in words."""
  origin = typing.get_origin(hint)
  if origin is tuple:
    return f"a list, each item {_allowed(typing.get_args(hint)[0], rule)}"
  if origin is not None and issubclass(origin, Mapping):
    return "an object with string keys"
  if dataclasses.is_dataclass(hint):
    return f"a {hint.__name__} (an object in a config file)"
  if "choices" in rule:
    return f"one of {list(rule['choices'])}"
  name = {bool: "true or false", str: "a string", int: "an integer",
          float: "a finite number"}[hint]
  if "text" in rule:
    return name + rule["text"]
  if "ge" in rule and "le" in rule and hint is int:
    return f"{name} in {rule['ge']}..{rule['le']}"
  bounds = [f"{sym} {rule[k]}" for k, sym, _ in _BOUNDS if k in rule]
  return f"{name} {' and '.join(bounds)}" if bounds else name


def _normalise(value: Any, hint: Any) -> Any:
  if typing.get_origin(hint) is tuple:
    inner = typing.get_args(hint)[0]
    return tuple(_normalise(v, inner) for v in value)
  if hint is float and type(value) is not float:
    return float(value)
  if hint is int and type(value) is not int:
    return int(value)
  return value



@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which model to train.

  base: a Pythia preset ("pythia-70m", ...), or "custom" with `overrides`
    giving every PythiaConfig shape field.
  init: "hf" loads the base weights from `checkpoint` (default
    EleutherAI/<base>); "random" initialises them (tests, from-scratch runs).
  overrides: PythiaConfig fields changed from the preset (all shape fields
    for "custom"); the four fields below set by name are not among them.
  """
  base: str = "pythia-70m"
  init: str = _field("hf", choices=("hf", "random"))
  checkpoint: str | None = None
  revision: str | None = None
  num_token_heads: int = _field(3, ge=1, le=8)
  head_init: str = _field("random", choices=HEAD_INITS)
  head_input: str = _field("stem", choices=HEAD_INPUTS)
  dtype: str = _field("bfloat16", choices=DTYPES)        # compute dtype
  param_dtype: str = _field("float32", choices=DTYPES)   # master weights
  overrides: Mapping[str, Any] = _field(factory=dict)

  def __post_init__(self):
    _check_fields(self, "model.")
    if self.base != "custom":
      try:
        preset(self.base)
      except ConfigError as e:
        raise ConfigError(f"model.base: {e} Or use 'custom' with every shape "
                          "field in model.overrides.") from None
    elif self.init == "hf" and not self.checkpoint:
      raise ConfigError("model.checkpoint must name the weights to load when "
                        "model.base is 'custom' and model.init is 'hf'.")
    object.__setattr__(self, "overrides", _check_overrides(self.overrides))
    self.pythia_config()  # cross-field checks (hidden_size % num_heads, ...)

  def pythia_config(self) -> PythiaConfig:
    """The DynaMo model's PythiaConfig, before any weights are read."""
    named = dict(num_token_heads=self.num_token_heads,
                 head_input=self.head_input, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    try:
      if self.base != "custom":
        return preset(self.base, **self.overrides, **named)
      missing = [f.name for f in dataclasses.fields(PythiaConfig)
                 if f.default is dataclasses.MISSING
                 and f.name not in self.overrides]
      if missing:
        raise ConfigError(f"base 'custom' needs every shape field; add "
                          f"{missing}.")
      return PythiaConfig(**self.overrides, **named)
    except ConfigError as e:
      raise ConfigError(f"model.overrides: {e}") from None


# PythiaConfig fields that ModelSpec sets by name, not through `overrides`.
_NAMED = ("num_token_heads", "head_input", "dtype", "param_dtype")


def _check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  hints = _hints(PythiaConfig)
  for key in overrides:
    if key in _NAMED:
      raise ConfigError(f"model.overrides.{key}: set model.{key} instead.")
  unknown = sorted(set(overrides) - set(hints) - set(_NAMED))
  if unknown:
    raise ConfigError(
        f"unknown config keys {[f'model.overrides.{k}' for k in unknown]}; "
        f"known in model.overrides.: "
        f"{sorted(set(hints) - set(_NAMED))}.")
  return {key: _check_value(f"model.overrides.{key}", value, hints[key], {})
          for key, value in overrides.items()}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with DynaMo's three learning rates (DYNAMO.md section 2).

  lr_base (LR_B) for the stem and head 1; lr_heads_mult x LR_B (LR_M) for the
  new heads; lr_stem_from_heads_mult x LR_B (LR_MB) for the part of the
  base's gradient that comes from heads 2..n, as its own Adam update.
  mode "heads_only" freezes the stem and head 1. head_loss_weights: one
  non-negative weight per token head (None: the heads' losses are summed).
  """
  lr_base: float = _field(1e-5, gt=0)
  lr_heads_mult: float = _field(100.0, ge=0)
  lr_stem_from_heads_mult: float = _field(0.1, ge=0)
  warmup_frac: float = _field(0.01, ge=0, lt=1)
  b1: float = _field(0.9, ge=0, lt=1)
  b2: float = _field(0.95, ge=0, lt=1)
  eps: float = _field(1e-8, gt=0)
  weight_decay: float = _field(0.01, ge=0)
  clip_norm: float | None = _field(1.0, gt=0)
  mode: str = _field("full", choices=("full", "heads_only"))
  head_loss_weights: tuple[float, ...] | None = _field(None, ge=0)

  def __post_init__(self):
    _check_fields(self, "optim.")
    weights = self.head_loss_weights
    if weights is not None and not any(weights):
      raise ConfigError(f"optim.head_loss_weights must not be all zero (no "
                        f"head would learn), got {list(weights)}.")


def _axis(default: int):
  return _field(default, ok=lambda v: v == -1 or 1 <= v <= INT_MAX,
                text=" >= 1, or -1 (the devices the other axes leave)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; one axis may be -1: all devices the other axes
  leave (make_mesh)."""
  data: int = _axis(1)
  fsdp: int = _axis(-1)
  tensor: int = _axis(1)

  def __post_init__(self):
    _check_fields(self, "mesh.")
    sizes = dataclasses.asdict(self)
    if list(sizes.values()).count(-1) > 1:
      raise ConfigError(f"at most one mesh axis may be -1, got {sizes}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSpec = ModelSpec()
  data: DataConfig | None = None
  tokenizer: str | None = None   # HF dir / hub id, "bytes"; None: the model's
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  seq_len: int = _field(2048, ge=2, le=INT_MAX)
  global_batch_size: int = _field(64, ge=1, le=INT_MAX)
  grad_accum: int = _field(1, ge=1, le=INT_MAX)
  steps: int = _field(75_800, ge=1, le=INT_MAX)
  seed: int = _field(0, ge=0, le=SEED_MAX)
  log_every: int = _field(10, ge=1, le=INT_MAX)
  ckpt_every: int = _field(1000, ge=1, le=INT_MAX)
  keep_checkpoints: int = _field(3, ge=1, le=INT_MAX)
  async_checkpoints: bool = True

  def __post_init__(self):
    _check_fields(self, "")
    if self.global_batch_size % self.grad_accum:
      raise ConfigError(f"global_batch_size {self.global_batch_size} is not "
                        f"divisible by grad_accum {self.grad_accum}.")
    n = self.model.num_token_heads
    weights = self.optim.head_loss_weights
    if weights is not None and len(weights) != n:
      raise ConfigError(f"optim.head_loss_weights must hold one weight per "
                        f"token head (model.num_token_heads = {n}), got "
                        f"{len(weights)}: {list(weights)}.")
    max_len = self.model.pythia_config().max_position_embeddings
    if not n < self.seq_len <= max_len:
      raise ConfigError(
          f"seq_len must lie in {n + 1}..{max_len} (head {n} predicts token "
          f"t+{n}; the model has max_position_embeddings={max_len}), got "
          f"{self.seq_len}.")

  def validate(self) -> "TrainConfig":
    """Checks what a training run needs beyond a well-formed config."""
    if self.data is None:
      raise ConfigError("the config has no `data` section; say where the "
                        "training text comes from (see DataConfig).")
    return self


# ---- loading -----------------------------------------------------------------

def _build(cls, d: Mapping[str, Any], where: str):
  if not isinstance(d, Mapping):
    raise ConfigError(f"{where[:-1] or 'the config'} must be a JSON object, "
                      f"got {_show(d)}.")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields), key=str)
  if unknown:
    raise ConfigError(f"unknown config keys {[f'{where}{k}' for k in unknown]};"
                      f" known in {where or 'the top level'}: {sorted(fields)}.")
  if cls is DataConfig:
    return DataConfig.from_dict(d)
  hints = _hints(cls)
  out = {}
  for key, value in d.items():
    hint = hints[key]
    if hint == (DataConfig | None):
      hint = DataConfig
    if dataclasses.is_dataclass(hint):
      out[key] = _build(hint, value, f"{where}{key}.")
    else:
      out[key] = value
  return cls(**out)


def _set(d: dict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    d = d.setdefault(p, {})
    if not isinstance(d, dict):
      raise ConfigError(f"override {dotted}: {p} is not a section.")
  d[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
  """'optim.lr_base=1e-5' -> ("optim.lr_base", 1e-5); values are JSON when
  they parse as JSON, else strings."""
  if "=" not in text:
    raise ConfigError(f"override {text!r} is not of the form key=value.")
  key, raw = text.split("=", 1)
  try:
    value = json.loads(raw)
  except ValueError:
    value = raw
  return key.strip(), value


def load_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
  """Loads a named config (CONFIG_DIR/NAME.json) or a JSON file's path, and
  applies the key=value overrides."""
  path = name_or_path if os.path.isfile(name_or_path) else os.path.join(
      CONFIG_DIR, f"{name_or_path}.json")
  if not os.path.isfile(path):
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(
        ".json")) if os.path.isdir(CONFIG_DIR) else "none: no folder there"
    raise ConfigError(f"no config {name_or_path!r}: not a file, and not one of "
                      f"the named configs in {CONFIG_DIR} ({known}); set "
                      "DYNAMO_CONFIG_DIR or give a JSON file's path.")
  try:
    with open(path, encoding="utf-8") as fh:
      raw = json.load(fh)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}.")
  raw.pop("description", None)
  for text in overrides:
    _set(raw, *parse_override(text))
  return _build(TrainConfig, raw, "").validate()


def to_dict(config: TrainConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)
