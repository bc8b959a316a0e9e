"""Pythia as a pure function of (config, params, tokens).

`params` is a plain nested dict of arrays (no boxing, no mutable collections):

  embed_in/embedding                       [V, D]
  layers_{i}/input_layernorm/{scale,bias}  [D]
  layers_{i}/attention/qkv_kernel          [D, H, 3, K]   qkv_bias [H, 3, K]
  layers_{i}/attention/out_kernel          [H, K, D]      out_bias [D]
  layers_{i}/post_attention_layernorm/...  [D]
  layers_{i}/mlp/in_kernel [D, F], in_bias [F], out_kernel [F, D], out_bias [D]
  final_layer_norm/{scale,bias}            [D]
  embed_out                                [D, V]
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.errors import InputError
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.layers import DecoderLayer, LayerNorm, _param

Params = dict[str, Any]
# {"layers_{i}": {"k": [B,S,H,K], "v": [B,S,H,K]}, "end": int32 [B]}
KVCache = dict[str, Any]


class Pythia(nn.Module):
  """GPT-NeoX decoder. Methods are usable on their own through `apply(method=)`."""
  config: PythiaConfig

  def setup(self):
    cfg = self.config
    self.embed_in = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
    self.layers = [DecoderLayer(cfg, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    self.final_layer_norm = LayerNorm(cfg)
    self.embed_out = _param(self, "embed_out",
                            (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                            nn.initializers.normal(0.02), cfg.param_dtype)

  def embed(self, tokens_BxT):
    return self.embed_in(tokens_BxT)

  def run_layers(self, x_BxTxD, positions_BxT, cache=None, end_B=None,
                 layers: range | None = None):
    """Runs decoder layers `layers` (default all) in order."""
    new_cache = {}
    for i in (range(self.config.num_layers) if layers is None else layers):
      name = f"layers_{i}"
      x_BxTxD, c = self.layers[i](x_BxTxD, positions_BxT,
                                  None if cache is None else cache[name], end_B)
      if c is not None:
        new_cache[name] = c
    return x_BxTxD, new_cache

  def unembed(self, x_BxTxD):
    """Final layer norm and untied output projection; float32 logits."""
    y_BxTxD = self.final_layer_norm(x_BxTxD)
    return jnp.einsum("btd,dv->btv", y_BxTxD,
                      self.embed_out.astype(self.config.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, cache=None, end_B=None):
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]),
                                       tokens_BxT.shape)
    x_BxTxD, new_cache = self.run_layers(self.embed(tokens_BxT), positions_BxT,
                                         cache, end_B)
    return self.unembed(x_BxTxD), new_cache


def _boxed_init(config: PythiaConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Pythia(config).init(rng, tokens)["params"]


def init_params(config: PythiaConfig, rng: jax.Array | int = 0) -> Params:
  """Random parameters (normal(0.02) weights, zero biases, unit LN scales)."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  return nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(config, rng))


def param_axes(config: PythiaConfig) -> Params:
  """Logical axis names of every parameter: a pytree of PartitionSpecs."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, config),
                         jax.random.PRNGKey(0))
  return nn.get_partition_spec(boxed)


def param_shapes(config: PythiaConfig) -> Params:
  """ShapeDtypeStructs of every parameter, computed without allocating."""
  return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, config),
                                      jax.random.PRNGKey(0)))


def check_tokens(config: PythiaConfig, tokens, *, offset: int = 0,
                 name: str = "input_ids") -> jax.Array:
  """Validates token ids [B, T]; concrete values are range-checked."""
  if isinstance(tokens, (list, tuple)):
    tokens = np.asarray(tokens)
  if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
    raise InputError(f"{name} must be an integer array [batch, time], got "
                     f"{type(tokens).__name__}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise InputError(f"{name} must have an integer dtype, got {tokens.dtype}; "
                     "pass token ids, not embeddings or floats.")
  if tokens.ndim != 2:
    raise InputError(f"{name} must have shape [batch, time], got "
                     f"{tuple(tokens.shape)}.")
  if tokens.shape[1] == 0 or tokens.shape[0] == 0:
    raise InputError(f"{name} is empty (shape {tuple(tokens.shape)}).")
  if offset + tokens.shape[1] > config.max_position_embeddings:
    raise InputError(
        f"{name} reaches position {offset + tokens.shape[1]}, beyond the "
        f"model's max_position_embeddings={config.max_position_embeddings}; "
        "shorten the input.")
  if not isinstance(tokens, jax.core.Tracer):
    host = np.asarray(tokens)
    lo, hi = host.min(), host.max()
    if lo < 0 or hi >= config.vocab_size:
      bad = lo if lo < 0 else hi
      raise InputError(f"{name} contains id {int(bad)} outside the vocabulary "
                       f"[0, {config.vocab_size}).")
  return jnp.asarray(tokens, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens_BxT):
  logits, _ = Pythia(config).apply({"params": params}, tokens_BxT)
  return logits


def forward(config: PythiaConfig, params: Params, input_ids) -> jax.Array:
  """Logits float32 [B, T, V] for int token ids [B, T] (numpy or jax)."""
  return _forward(config, params, check_tokens(config, input_ids))


# ---- KV cache ---------------------------------------------------------------

def init_cache(config: PythiaConfig, batch: int, max_len: int,
               layers: range | None = None, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots per row, end index 0."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, max_len, config.num_heads, config.head_dim)
  cache: KVCache = {
      f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
      for i in (range(config.num_layers) if layers is None else layers)}
  cache["end"] = jnp.zeros((batch,), jnp.int32)
  return cache


def forward_cached(config: PythiaConfig, params: Params, cache: KVCache,
                   tokens_BxT, lengths_B=None):
  """One cached forward pass over a chunk of T tokens per row.

  Row b's tokens take positions end[b] .. end[b]+T-1; only its first
  lengths_B[b] tokens (default all T) count, so `end` advances by lengths_B.
  Entries written past the new end are overwritten by the next call before
  any query can see them. The cache must have end + T <= S slots.

  Returns (logits float32 [B, T, V], new cache). Pure; jit it with
  `donate_argnums=2` to update the cache in place.
  """
  end_B = cache["end"]
  t = tokens_BxT.shape[1]
  positions_BxT = end_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  logits, layer_caches = Pythia(config).apply(
      {"params": params}, tokens_BxT, positions_BxT, cache, end_B)
  if lengths_B is None:
    lengths_B = jnp.full_like(end_B, t)
  return logits, {**layer_caches, "end": end_B + lengths_B.astype(jnp.int32)}
