"""Typed, frozen training configs, loaded from JSON with key=value overrides.

A config file (experiments/configs/NAME.json) holds the sections below; any
key it omits takes the default here. Unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

from dynamo_jax.data import DataConfig
from dynamo_jax.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                          "configs")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which model to train.

  base: a Pythia preset ("pythia-70m", ...), or "custom" with `overrides`
    giving every PythiaConfig shape field.
  init: "hf" loads the base weights from `checkpoint` (default
    EleutherAI/<base>); "random" initialises them (tests, from-scratch runs).
  """
  base: str = "pythia-70m"
  init: str = "hf"
  checkpoint: str | None = None
  revision: str | None = None
  num_token_heads: int = 3
  head_init: str = "random"
  head_input: str = "stem"
  dtype: str = "bfloat16"        # compute dtype
  param_dtype: str = "float32"   # master weights
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with DynaMo's three learning rates (DYNAMO.md section 2).

  lr_base (LR_B) for the stem and head 1; lr_heads_mult x LR_B (LR_M) for the
  new heads; lr_stem_from_heads_mult x LR_B (LR_MB) for the part of the
  base's gradient that comes from heads 2..n, as its own Adam update.
  mode "heads_only" freezes the stem and head 1.
  """
  lr_base: float = 1e-5
  lr_heads_mult: float = 100.0
  lr_stem_from_heads_mult: float = 0.1
  warmup_frac: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float | None = 1.0
  mode: str = "full"
  head_loss_weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = -1   # -1: all devices not used by the other axes
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSpec = ModelSpec()
  data: DataConfig | None = None
  tokenizer: str | None = None   # HF dir / hub id, "bytes"; None: the model's
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  seq_len: int = 2048
  global_batch_size: int = 64
  grad_accum: int = 1
  steps: int = 75_800
  seed: int = 0
  log_every: int = 10
  ckpt_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True

  def validate(self) -> "TrainConfig":
    if self.data is None:
      raise ConfigError("the config has no `data` section; say where the "
                        "training text comes from (see DataConfig).")
    if self.optim.mode not in ("full", "heads_only"):
      raise ConfigError(f"optim.mode {self.optim.mode!r}: use 'full' or "
                        "'heads_only'.")
    if self.model.init not in ("hf", "random"):
      raise ConfigError(f"model.init {self.model.init!r}: use 'hf' or 'random'.")
    for name in ("seq_len", "global_batch_size", "grad_accum", "steps",
                 "log_every", "ckpt_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.global_batch_size % self.grad_accum:
      raise ConfigError(f"global_batch_size {self.global_batch_size} is not "
                        f"divisible by grad_accum {self.grad_accum}.")
    weights = self.optim.head_loss_weights
    if weights is not None and len(weights) != self.model.num_token_heads:
      raise ConfigError(f"optim.head_loss_weights has {len(weights)} entries "
                        f"for {self.model.num_token_heads} heads.")
    return self


def _build(cls, d: Mapping[str, Any], where: str):
  if not isinstance(d, Mapping):
    raise ConfigError(f"{where or 'config'} must be a JSON object, got {d!r}.")
  if cls is DataConfig:
    return DataConfig.from_dict(d)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f"unknown config keys {[f'{where}{k}' for k in unknown]};"
                      f" known in {where or 'the top level'}: {sorted(fields)}.")
  out = {}
  for key, value in d.items():
    hint = hints[key]
    if hint == (DataConfig | None):
      hint = DataConfig
    if dataclasses.is_dataclass(hint):
      out[key] = _build(hint, value, f"{where}{key}.")
    elif isinstance(value, list):
      out[key] = tuple(value)
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
  """Loads experiments/configs/NAME.json (or a path) and applies overrides."""
  path = name_or_path
  if not os.path.exists(path):
    path = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
  if not os.path.exists(path):
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise ConfigError(f"no config {name_or_path!r}: not a file, and not one of "
                      f"{known}.")
  try:
    with open(path) as fh:
      raw = json.load(fh)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  raw.pop("description", None)
  for text in overrides:
    _set(raw, *parse_override(text))
  return _build(TrainConfig, raw, "").validate()


def to_dict(config: TrainConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)
