"""DynaMo token heads: grow a Pythia into a DynaMo-Tn model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from dynamo_jax.errors import ConfigError
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.layers import DecoderLayer
from dynamo_jax.model.pythia import Params

HEAD_INITS = ("random", "copy")


def add_heads(config: PythiaConfig, params: Params, n: int, *, rng,
              init: str = "random") -> tuple[PythiaConfig, Params]:
  """Returns a DynaMo-Tn (config, params): heads 2..n added, the rest shared.

  init="random": each new head is a freshly initialised decoder layer (the
  paper's choice); init="copy": a copy of layer L (the paper's ablation).
  Heads the model already has are kept. `params` is not modified.
  """
  if not isinstance(n, int) or not config.num_token_heads <= n <= 8:
    raise ConfigError(f"n must be an integer in {config.num_token_heads}..8 "
                      f"(the model has {config.num_token_heads} heads), got {n!r}.")
  if init not in HEAD_INITS:
    raise ConfigError(f"init {init!r} unknown; choose one of {HEAD_INITS}.")
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  new_config = config.replace(num_token_heads=n)
  new_params = dict(params)
  last = params[f"layers_{config.num_layers - 1}"]
  x = jnp.zeros((1, 1, config.hidden_size), jnp.dtype(config.dtype))
  pos = jnp.zeros((1, 1), jnp.int32)
  for i in range(config.num_token_heads + 1, n + 1):
    if init == "copy":
      new_params[f"heads_{i}"] = jax.tree.map(jnp.copy, last)
    else:
      boxed = DecoderLayer(config).init(jax.random.fold_in(rng, i), x, pos)
      new_params[f"heads_{i}"] = nn.meta.unbox(boxed)["params"]
  return new_config, new_params
