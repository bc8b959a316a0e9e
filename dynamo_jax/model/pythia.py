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
from dynamo_jax.model.layers import (DecoderLayer, Embed, LayerNorm, dense,
                                     param)
from dynamo_jax.model.partitioning import constrain

Params = dict[str, Any]
# Logical layout of the residual stream [B, T, D] (see partitioning.py):
# rows split like the batch, D whole on every device.
RESIDUAL_AXES = ("batch", None, None)
# {"layers_{i}": {"k": [B*H,S,Dh], "v": [B*H,S,Dh]}, "end": int32 [B]}
# (layout: dynamo_jax.model.layers.Cache)
KVCache = dict[str, Any]


class Pythia(nn.Module):
  """GPT-NeoX decoder, optionally with DynaMo token heads 2..N.

  Head 1 is the last decoder layer + final layer norm + embed_out, so with
  head 1 alone this is Pythia exactly. Heads 2..N are extra decoder layers
  (`heads_{i}`) reading the stem output (input of layer L) or, with
  head_input="last", the output of layer L; all heads share the final layer
  norm and embed_out. Methods are usable alone through `apply(method=...)`.
  """
  config: PythiaConfig

  def setup(self):
    cfg = self.config
    self.embed_in = Embed(cfg)
    self.layers = [DecoderLayer(cfg, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    self.heads = [DecoderLayer(cfg, name=f"heads_{i}")
                  for i in range(2, cfg.num_token_heads + 1)]
    self.final_layer_norm = LayerNorm(cfg)
    self.embed_out = param(self, "embed_out",
                           (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                           nn.initializers.normal(0.02), cfg.param_dtype)

  def unembed(self, x_BxTxD):
    """Final layer norm and untied output projection; float32 logits."""
    y_BxTxD = self.final_layer_norm(x_BxTxD)
    return dense("btd,dv->btv", y_BxTxD,
                 self.embed_out.astype(self.config.dtype),
                 self.config.weight_layout,
                 preferred_element_type=jnp.float32)

  def hidden_states(self, tokens_BxT, positions_BxT, cache=None, end_B=None,
                    all_heads: bool = False, tree_TxT=None):
    """Pre-layer-norm outputs of head 1 (and heads 2..N): a list of [B,T,D].

    Returns (hiddens, cache updates): the updated cache entries by name.
    """
    return self.hidden_states_from_embeddings(
        self.embed_in(tokens_BxT), positions_BxT, cache, end_B, all_heads,
        tree_TxT)

  def hidden_states_from_embeddings(self, x_BxTxD, positions_BxT, cache=None,
                                    end_B=None, all_heads: bool = False,
                                    tree_TxT=None):
    updates = {}

    def run(layer, name, x_BxTxD):
      y_BxTxD, c = layer(x_BxTxD, positions_BxT,
                         None if cache is None else cache[name], end_B,
                         tree_TxT)
      if c is not None:
        updates[name] = c
      return constrain(y_BxTxD, RESIDUAL_AXES)

    x_BxTxD = constrain(x_BxTxD, RESIDUAL_AXES)

    last = self.config.num_layers - 1
    for i in range(last):
      x_BxTxD = run(self.layers[i], f"layers_{i}", x_BxTxD)
    stem_BxTxD = x_BxTxD
    hiddens = [run(self.layers[last], f"layers_{last}", stem_BxTxD)]
    if all_heads:
      source = stem_BxTxD if self.config.head_input == "stem" else hiddens[0]
      for i, head in enumerate(self.heads, start=2):
        hiddens.append(run(head, f"heads_{i}", source))
    return hiddens, updates

  def __call__(self, tokens_BxT, positions_BxT=None, cache=None, end_B=None,
               all_heads: bool = False, select_B=None,
               exact_head1: bool = True, tree_TxT=None,
               hidden_only: bool = False):
    """Logits float32 [B,T,V] (head 1), or [N,B,T,V] with all_heads.
    hidden_only: the heads' pre-layer-norm outputs [N,B,T,D] instead of
    logits, for a caller that unembeds only the positions it needs.

    select_B: int [B], unembed only position select_B[b] of each row (T = 1
    in the output): a decode step needs one position, not the whole chunk.
    exact_head1=False (all_heads only): one unembedding matmul for all heads,
    so embed_out is read once, not twice; head 1's logits may then differ
    from the base model's in the last bits (see below).
    """
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]),
                                       tokens_BxT.shape)
    hiddens, updates = self.hidden_states(tokens_BxT, positions_BxT, cache,
                                          end_B, all_heads, tree_TxT)
    if select_B is not None:
      rows_B = jnp.arange(tokens_BxT.shape[0])
      hiddens = [h[rows_B, select_B][:, None] for h in hiddens]
    if hidden_only:
      return jnp.stack(hiddens), updates
    if not all_heads:
      return self.unembed(hiddens[0]), updates
    # Heads 2..N share one projection: separate ones would each read the
    # whole [D, V] embed_out, at decode time most of a head's bytes. Head 1
    # keeps its own, the same matmul as the base model's: a matmul with more
    # rows may round differently, and head 1 must equal the base bit for bit
    # (eps_b = 1 and verified greedy reproduce plain AR exactly). The
    # native matmul (weight_layout "panels") computes each row alone
    # (kernels/cpu_rows.cc), so there one matmul keeps head 1 exact.
    b, t, _ = hiddens[0].shape
    if not exact_head1 or self.config.weight_layout == "panels":
      logits_NBxTxV = self.unembed(jnp.concatenate(hiddens, axis=0))
      return logits_NBxTxV.reshape(len(hiddens), b, t, -1), updates
    head1_BxTxV = self.unembed(hiddens[0])
    if len(hiddens) == 1:
      return head1_BxTxV[None], updates
    rest_NBxTxV = self.unembed(jnp.concatenate(hiddens[1:], axis=0))
    return jnp.concatenate([head1_BxTxV[None],
                            rest_NBxTxV.reshape(-1, b, t, head1_BxTxV.shape[-1])]
                           ), updates


def _boxed_init(config: PythiaConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Pythia(config).init(rng, tokens, all_heads=True)["params"]


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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(config, params, tokens_BxT, all_heads):
  logits, _ = Pythia(config).apply({"params": params}, tokens_BxT,
                                   all_heads=all_heads)
  return logits


def forward(config: PythiaConfig, params: Params, input_ids, *,
            all_heads: bool = False) -> jax.Array:
  """Logits for int token ids [B, T] (numpy or jax).

  Head 1 (the base Pythia): float32 [B, T, V]. With `all_heads`, every token
  head: float32 [N, B, T, V], where head i predicts token t+i at position t.
  """
  return _forward(config, params, check_tokens(config, input_ids),
                  bool(all_heads))


# ---- KV cache ---------------------------------------------------------------

def init_cache(config: PythiaConfig, batch: int, max_len: int, *,
               all_heads: bool = False, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots per row (end index 0) for every
  decoder layer, plus every token head's layer when `all_heads`; layout in
  `dynamo_jax.model.layers.Cache`."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch * config.num_heads, max_len, config.head_dim)
  names = [f"layers_{i}" for i in range(config.num_layers)]
  if all_heads:
    names += [f"heads_{i}" for i in range(2, config.num_token_heads + 1)]
  cache: KVCache = {n: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                    for n in names}
  cache["end"] = jnp.zeros((batch,), jnp.int32)
  return cache


def forward_cached(config: PythiaConfig, params: Params, cache: KVCache,
                   tokens_BxT, lengths_B=None, *, all_heads: bool = False,
                   last_only: bool = False, exact_head1: bool = True,
                   tree_TxT=None, hidden_only: bool = False):
  """One cached forward pass over a chunk of T tokens per row.

  Row b's tokens take positions end[b] .. end[b]+T-1; only its first
  lengths_B[b] tokens (default all T) count, so `end` advances by lengths_B.
  Entries written past the new end are overwritten by the next call before
  any query can see them. The cache must have end + T <= S slots.

  Returns (logits float32 [B, T, V], or [N, B, T, V] with all_heads, and the
  new cache). The cache needs head entries (`init_cache(all_heads=True)`)
  when all_heads. With last_only, logits are computed only at each row's
  last valid position (T = 1 in the output). exact_head1=False (with
  all_heads) unembeds all heads in one matmul: embed_out is read once
  instead of twice, and head 1 may differ from the base model by rounding
  (~1e-6). Pure; jit it with `donate_argnums=2` to update in place.

  tree_TxT: bool [T, T] (static topology, the same for every row), token j
  is token i's ancestor or i itself; then the chunk is a tree of
  continuations rather than a sequence: token i sits at position end +
  depth(i) (depth = ancestors - 1) and attends to the past and its
  ancestors only, so its logits are those of the uncached forward over the
  past plus its root-to-i path. The caller keeps one path afterwards
  (moving its entries to end.. and setting `end`).

  hidden_only: return the heads' pre-layer-norm outputs [N, B, T, D] (N = 1
  without all_heads) instead of logits; `unembed` turns the rows a caller
  needs into logits (a verifier needs head 1 at a few positions and heads
  2..n at one, not every head at every fed position).
  """
  end_B = cache["end"]
  t = tokens_BxT.shape[1]
  if tree_TxT is None:
    offsets_T = jnp.arange(t, dtype=jnp.int32)
  else:
    offsets_T = jnp.sum(jnp.asarray(tree_TxT, jnp.int32), axis=1) - 1
  positions_BxT = end_B[:, None] + offsets_T[None, :]
  if lengths_B is None:
    lengths_B = jnp.full_like(end_B, t)
  select_B = jnp.maximum(lengths_B - 1, 0) if last_only else None
  logits, updates = Pythia(config).apply(
      {"params": params}, tokens_BxT, positions_BxT, cache, end_B,
      all_heads=all_heads, select_B=select_B, exact_head1=exact_head1,
      tree_TxT=tree_TxT, hidden_only=hidden_only)
  return logits, {**cache, **updates,
                  "end": end_B + lengths_B.astype(jnp.int32)}


def unembed(config: PythiaConfig, params: Params, hidden_XxD) -> jax.Array:
  """Final layer norm and embed_out on hidden states [..., D] (any leading
  axes, e.g. from `forward_cached(hidden_only=True)`): float32 [..., V]."""
  shape = hidden_XxD.shape
  logits = Pythia(config).apply({"params": params},
                                hidden_XxD.reshape(1, -1, shape[-1]),
                                method=Pythia.unembed)
  return logits.reshape(shape[:-1] + (logits.shape[-1],))
