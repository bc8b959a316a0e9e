"""GPT-NeoX building blocks as Flax Linen modules over plain parameter pytrees.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `qkv`,
`head_dim`, `mlp`); the training code maps them onto a device mesh with one
rules table (`dynamo_jax.training.sharding.RULES`). Shape letters are
defined in `dynamo_jax.model.config`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.partitioning import constrain

# A layer's KV cache: {"k": [BH, S, Dh], "v": [BH, S, Dh]}, BH = B x H (row
# b's heads at b*H .. b*H+H-1). The decode attention's two products read it
# as it is, with one batch axis, so XLA:CPU updates it in place and reads it
# without a copy. As [B, S, H, Dh] every pass copied each layer's keys and
# values into the products' layout; with two batch axes ([B, H, ...]) XLA
# fused the write into a product's operand too, writing each new entry into
# two copies of the cache (README, Decoding, "The KV cache in place").
Cache = dict[str, jax.Array]


def dense(spec: str, x, w, layout: str = "standard", **kwargs):
  """`jnp.einsum(spec, x, w)` for an activation x [B, T, ...] and a weight
  w, giving [B, T, ...] (spec starts "bt" for x and for the output).

  layout "panels": w is in the native CPU kernel's layout and the product is
  that kernel's (dynamo_jax.kernels.cpu_matmul; float32).

  On CPU, XLA computes a bfloat16 product whose activation has a single row
  (a batch-1 decode step) with a matrix-vector loop that first converts the
  whole weight to float32, in every call unless the conversion can be
  hoisted out of the decode loop; with two or more rows it calls a bf16
  matmul library instead. Measured at pythia-160m's embed_out (768 x 50304,
  2-core AMD EPYC, jax 0.10.2): 63 ms for one row, 5.5 ms for two. There
  such a row is computed twice and one copy kept (lax.platform_dependent:
  only the CPU lowering does this; TPU and GPU programs, exported ones
  included, get the plain einsum). The result may differ from the one-row
  path in the last bits (float32 sums in another order).
  """
  if layout == "panels":
    from dynamo_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
    return cpu_matmul.dense_panels(spec, x, w)
  out = functools.partial(jnp.einsum, spec, **kwargs)
  if x.shape[:2] != (1, 1) or x.dtype != jnp.bfloat16:
    return out(x, w)

  def two_rows(x, w):
    return out(jnp.concatenate([x, x], axis=1), w)[:, :1]

  return jax.lax.platform_dependent(x, w, cpu=two_rows, default=out)


def param(module: nn.Module, name: str, shape, axes, init, dtype):
  """`module.param` with logical axis names `axes`, in `dtype`."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(dtype))


class Embed(nn.Module):
  """Token embedding `embedding` [V, D] (the Pythia embed_in), a lookup in
  the compute dtype."""
  config: PythiaConfig

  @nn.compact
  def __call__(self, tokens_BxT):
    cfg = self.config
    table_VxD = param(self, "embedding", (cfg.vocab_size, cfg.hidden_size),
                      ("vocab", "embed"), nn.initializers.normal(0.02),
                      cfg.param_dtype)
    # Gathered whole along D before the lookup (FSDP's all-gather): a lookup
    # into D-split rows would hand the batch-split stream a D-split layout.
    table_VxD = constrain(table_VxD.astype(cfg.dtype), ("vocab", None))
    return jnp.take(table_VxD, tokens_BxT, axis=0)


class LayerNorm(nn.Module):
  """LayerNorm with bias; statistics in float32 (as torch does for fp32)."""
  config: PythiaConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    d = x_BxTxD.shape[-1]
    scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones,
                  cfg.param_dtype)
    bias = param(self, "bias", (d,), ("embed",), nn.initializers.zeros,
                 cfg.param_dtype)
    # Replicated before use, so the elementwise products (and their
    # gradients) keep the activations' batch layout.
    scale, bias = constrain(scale, (None,)), constrain(bias, (None,))
    x = x_BxTxD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + cfg.layer_norm_eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(cfg.dtype)


def rotary_cos_sin(config: PythiaConfig, positions_BxT):
  """cos, sin of shape [B, T, 1, rotary_dim] in float32 (rotate-half layout)."""
  rd = config.rotary_dim
  inv_freq = 1.0 / (config.rotary_emb_base
                    ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x_BxTxHxDh, cos, sin, rotary_dim: int):
  """Rotates the first `rotary_dim` dims of each head; the rest pass through."""
  if rotary_dim == 0:
    return x_BxTxHxDh
  x = x_BxTxHxDh.astype(jnp.float32)
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  x_rot = x_rot * cos + rotated * sin
  return jnp.concatenate([x_rot, x_pass], axis=-1).astype(x_BxTxHxDh.dtype)


def write_cache(cache_BHxSxDh, new_BxTxHxDh, end_B):
  """Writes each row's T new entries at that row's own end index."""
  b, _, h, dh = new_BxTxHxDh.shape
  new_BxHxTxDh = jnp.swapaxes(new_BxTxHxDh, 1, 2).astype(cache_BHxSxDh.dtype)
  cache_BxHxSxDh = jax.vmap(
      lambda c, u, e: jax.lax.dynamic_update_slice(c, u, (0, e, 0))
  )(cache_BHxSxDh.reshape(b, h, -1, dh), new_BxHxTxDh, end_B)
  return cache_BxHxSxDh.reshape(b * h, -1, dh)


def tree_mask(tree_TxT, end_B, s: int):
  """bool [B, T, S]: which cache slots each of a tree chunk's T tokens sees.

  The chunk sits at slots end..end+T-1; tree_TxT[i, j] says token j is token
  i's ancestor or itself. Every slot before `end` (the accepted past) is
  visible; in the chunk, only ancestors; slots after it are not.
  """
  t = tree_TxT.shape[0]
  rel_BxS = jnp.arange(s)[None, :] - end_B[:, None]
  in_chunk_BxS = (rel_BxS >= 0) & (rel_BxS < t)
  anc_TxBxS = jnp.asarray(tree_TxT, jnp.bool_)[:, jnp.clip(rel_BxS, 0, t - 1)]
  return ((rel_BxS < 0)[:, None, :]
          | (in_chunk_BxS[:, None, :] & jnp.swapaxes(anc_TxBxS, 0, 1)))


def _masked_softmax(cfg: PythiaConfig, scores_BxHxTxS, mask_BxTxS):
  """Attention weights in the compute dtype: softmax over S in float32 of
  the scores where mask_BxTxS holds (every head alike), 0 elsewhere."""
  scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS,
                             jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(cfg.dtype)


def _attend_chunk(cfg: PythiaConfig, q_BxTxHxDh, k_BxTxHxDh, v_BxTxHxDh,
                  positions_BxT):
  """Causal attention within one chunk (no cache): training, scoring."""
  # Scores and softmax in float32; scaling 1/sqrt(head_dim) as GPT-NeoX.
  scores_BxHxTxT = jnp.einsum(
      "bthk,bshk->bhts", q_BxTxHxDh, k_BxTxHxDh,
      preferred_element_type=jnp.float32) * (cfg.head_dim ** -0.5)
  mask_BxTxT = positions_BxT[:, None, :] <= positions_BxT[:, :, None]
  probs_BxHxTxT = _masked_softmax(cfg, scores_BxHxTxT, mask_BxTxT)
  return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxT, v_BxTxHxDh)


def _attend_cache(cfg: PythiaConfig, q_BxTxHxDh, keys_BHxSxDh,
                  values_BHxSxDh, mask_BxTxS):
  """A decode chunk's T queries against the cache (see `Cache`)."""
  b, t, h, dh = q_BxTxHxDh.shape
  q_BHxTxDh = jnp.swapaxes(q_BxTxHxDh, 1, 2).reshape(b * h, t, dh)
  scores_BHxTxS = jnp.einsum(
      "ntk,nsk->nts", q_BHxTxDh, keys_BHxSxDh.astype(cfg.dtype),
      preferred_element_type=jnp.float32) * (dh ** -0.5)
  probs_BxHxTxS = _masked_softmax(cfg, scores_BHxTxS.reshape(b, h, t, -1),
                                  mask_BxTxS)
  out_BHxTxDh = jnp.einsum("nts,nsk->ntk", probs_BxHxTxS.reshape(b * h, t, -1),
                           values_BHxSxDh.astype(cfg.dtype))
  return jnp.swapaxes(out_BHxTxDh.reshape(b, h, t, dh), 1, 2)


class Attention(nn.Module):
  """Causal self-attention with fused per-head QKV and partial rotary."""
  config: PythiaConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache: Cache | None = None,
               end_B=None, tree_TxT=None):
    cfg = self.config
    d, h, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    init = nn.initializers.normal(0.02)
    # GPT-NeoX interleaves the fused QKV projection per head: [H, 3, K].
    w_qkv = param(self, "qkv_kernel", (d, h, 3, k),
                  ("embed", "heads", "qkv", "head_dim"), init, cfg.param_dtype)
    b_qkv = param(self, "qkv_bias", (h, 3, k), ("heads", "qkv", "head_dim"),
                  nn.initializers.zeros, cfg.param_dtype)
    w_out = param(self, "out_kernel", (h, k, d), ("heads", "head_dim", "embed"),
                  init, cfg.param_dtype)
    b_out = param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros,
                  cfg.param_dtype)

    qkv_BxTxHx3xDh = dense("btd,dhck->bthck", x_BxTxD,
                           w_qkv.astype(cfg.dtype), cfg.weight_layout)
    qkv_BxTxHx3xDh = qkv_BxTxHx3xDh + b_qkv.astype(cfg.dtype)
    q_BxTxHxDh, k_BxTxHxDh, v_BxTxHxDh = (qkv_BxTxHx3xDh[:, :, :, i]
                                       for i in range(3))
    cos, sin = rotary_cos_sin(cfg, positions_BxT)
    q_BxTxHxDh = apply_rotary(q_BxTxHxDh, cos, sin, cfg.rotary_dim)
    k_BxTxHxDh = apply_rotary(k_BxTxHxDh, cos, sin, cfg.rotary_dim)

    if cache is None:
      out_BxTxHxDh = _attend_chunk(cfg, q_BxTxHxDh, k_BxTxHxDh, v_BxTxHxDh,
                                   positions_BxT)
      new_cache = None
    else:
      keys_BHxSxDh = write_cache(cache["k"], k_BxTxHxDh, end_B)
      values_BHxSxDh = write_cache(cache["v"], v_BxTxHxDh, end_B)
      new_cache = {"k": keys_BHxSxDh, "v": values_BHxSxDh}
      s = keys_BHxSxDh.shape[1]
      if tree_TxT is None:
        # Causal by position: a slot is visible iff its position <= the
        # query's. Slots past the query are either unwritten or this
        # call's own later tokens, so this one mask is exact.
        mask_BxTxS = jnp.arange(s)[None, None, :] <= positions_BxT[:, :, None]
      else:
        mask_BxTxS = tree_mask(tree_TxT, end_B, s)
      out_BxTxHxDh = _attend_cache(cfg, q_BxTxHxDh, keys_BHxSxDh,
                                   values_BHxSxDh, mask_BxTxS)
    y_BxTxD = dense("bthk,hkd->btd", out_BxTxHxDh,
                    w_out.astype(cfg.dtype),
                    cfg.weight_layout) + b_out.astype(cfg.dtype)
    return y_BxTxD, new_cache


class Mlp(nn.Module):
  config: PythiaConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(0.02)
    w_in = param(self, "in_kernel", (d, f), ("embed", "mlp"), init,
                 cfg.param_dtype)
    b_in = param(self, "in_bias", (f,), ("mlp",), nn.initializers.zeros,
                 cfg.param_dtype)
    w_out = param(self, "out_kernel", (f, d), ("mlp", "embed"), init,
                  cfg.param_dtype)
    b_out = param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros,
                  cfg.param_dtype)
    h_BxTxF = (dense("btd,df->btf", x_BxTxD, w_in.astype(cfg.dtype),
                     cfg.weight_layout)
               + b_in.astype(cfg.dtype))
    h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=cfg.hidden_act == "gelu_tanh")
    return dense("btf,fd->btd", h_BxTxF, w_out.astype(cfg.dtype),
                 cfg.weight_layout) + b_out.astype(cfg.dtype)


class DecoderLayer(nn.Module):
  """One GPT-NeoX layer; parallel or sequential residual per the config."""
  config: PythiaConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache: Cache | None = None,
               end_B=None, tree_TxT=None) -> tuple[Any, Cache | None]:
    cfg = self.config
    attn_BxTxD, new_cache = Attention(cfg, name="attention")(
        LayerNorm(cfg, name="input_layernorm")(x_BxTxD), positions_BxT,
        cache, end_B, tree_TxT)
    post_ln = LayerNorm(cfg, name="post_attention_layernorm")
    mlp = Mlp(cfg, name="mlp")
    if cfg.use_parallel_residual:
      y_BxTxD = x_BxTxD + attn_BxTxD + mlp(post_ln(x_BxTxD))
    else:
      h_BxTxD = x_BxTxD + attn_BxTxD
      y_BxTxD = h_BxTxD + mlp(post_ln(h_BxTxD))
    return y_BxTxD, new_cache
