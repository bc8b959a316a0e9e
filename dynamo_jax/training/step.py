"""Train state, its shardings, sharded init, and the jitted train step.

State is a plain dict {"step": int32 [], "params": ..., "opt": ...}. Sharded
init follows eval_shape -> shardings -> jit(init, out_shardings=...). The
train step is the pure module-level `train_step`; `make_train_step` jits it
with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.partitioning import activation_sharding
from dynamo_jax.model.pythia import init_params, param_axes, param_shapes
from dynamo_jax.training.loss import head_losses
from dynamo_jax.training.optimizer import DynamoOptimizer, split
from dynamo_jax.training.sharding import (RULES, batch_sharding,
                                          param_shardings, replicated)

State = dict[str, Any]


def state_shardings(config: PythiaConfig, opt: DynamoOptimizer, mesh: Mesh):
  """(abstract state, state shardings) without allocating anything."""
  shapes = param_shapes(config)
  p_sh = param_shardings(param_axes(config), shapes, mesh)
  opt_shapes = jax.eval_shape(opt.init, shapes)
  base_sh, heads_sh = split(p_sh)
  rep = replicated(mesh)
  opt_sh = {"heads": _map(opt.heads, opt_shapes["heads"], heads_sh, rep)}
  if opt.mode == "full":
    opt_sh["base"] = _map(opt.base, opt_shapes["base"], base_sh, rep)
    opt_sh["stem_from_heads"] = _map(opt.stem_from_heads,
                                     opt_shapes["stem_from_heads"], base_sh, rep)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
              "opt": opt_shapes}
  shardings = {"step": rep, "params": p_sh, "opt": opt_sh}
  return abstract, shardings


def _map(tx, opt_state, sharding_tree, rep):
  """Param-shaped leaves of an optax state take the params' shardings."""
  return optax.tree_map_params(tx, lambda _, s: s, opt_state, sharding_tree,
                               transform_non_params=lambda _: rep)


def init_state(params_fn: Callable[[], Any], opt: DynamoOptimizer, shardings):
  """Builds the state directly in its shardings.

  params_fn: () -> params, traced under jit (random init), or a params tree
  already in memory (a converted checkpoint), placed with device_put.
  """
  if callable(params_fn):
    params = jax.jit(params_fn, out_shardings=shardings["params"])()
  else:
    params = jax.device_put(params_fn, shardings["params"])
  opt_state = jax.jit(opt.init, out_shardings=shardings["opt"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "params": params, "opt": opt_state}


def random_params_fn(config: PythiaConfig, seed: int):
  """() -> `init_params(config, seed)`, for `init_state` to trace under jit."""
  return functools.partial(init_params, config, seed)


def _grads(config: PythiaConfig, opt: DynamoOptimizer, weights_N, params,
           tokens_BxT, seg_BxT, loss_mask_BxT=None):
  """(g1, g2, losses_N): gradients of the weighted head-1 loss and of the
  weighted sum of heads 2..N's losses, and the unweighted losses."""
  def objective(p):
    losses_N, _ = head_losses(config, p, tokens_BxT, seg_BxT, loss_mask_BxT)
    weighted_N = weights_N * losses_N
    return (weighted_N[0], jnp.sum(weighted_N[1:])), losses_N
  _, vjp_fn, losses_N = jax.vjp(objective, params, has_aux=True)
  one, zero = jnp.float32(1.0), jnp.float32(0.0)
  # Each gradient is a backward pass; skip the ones that are known zeros
  # (g2 without extra heads) or unused (g1 when the base is frozen).
  if config.num_token_heads == 1:
    g1 = vjp_fn((one, zero))[0]
    return g1, jax.tree.map(jnp.zeros_like, g1), losses_N
  g2 = vjp_fn((zero, one))[0]
  g1 = vjp_fn((one, zero))[0] if opt.mode == "full" else g2
  return g1, g2, losses_N


def train_step(config: PythiaConfig, opt: DynamoOptimizer, mesh: Mesh,
               state: State, batch, *, grad_accum: int = 1,
               head_weights: tuple[float, ...] | None = None):
  """One optimizer step: (state, batch) -> (new state, metrics). Pure;
  `make_train_step` jits it with shardings and the state donated.

  batch: {"tokens": int32 [B, T], "segment_ids": int32 [B, T]}, B global;
    instruction batches add "loss_mask": bool [B, T] (targets counted only
    on response tokens, `head_losses`).
  metrics: loss (weighted sum over heads), head_loss [N], lr, grad norms.
  """
  n = config.num_token_heads
  weights_N = jnp.asarray(head_weights or (1.0,) * n, jnp.float32)
  grads = functools.partial(_grads, config, opt, weights_N)
  # Activations take the batch's layout (model/partitioning.py) while the
  # step traces; the model is otherwise free of mesh code.
  with activation_sharding(mesh, RULES):
    params = state["params"]
    # Pre-training batches have no "loss_mask": the step then traces exactly
    # as before it existed.
    rows = (batch["tokens"], batch["segment_ids"]) + (
        (batch["loss_mask"],) if "loss_mask" in batch else ())
    if grad_accum == 1:
      g1, g2, losses_N = grads(params, *rows)
    else:
      # Microbatch j takes rows j::A, so each stays spread over the devices.
      def micro(x_BxT):
        b, t = x_BxT.shape
        return x_BxT.reshape(b // grad_accum, grad_accum, t).transpose(1, 0, 2)

      def body(acc, xs):
        out = grads(params, *xs)
        return jax.tree.map(jnp.add, acc, out), None

      zeros = jax.tree.map(jnp.zeros_like, (params, params,
                                            jnp.zeros((n,), jnp.float32)))
      acc, _ = jax.lax.scan(body, zeros, tuple(micro(x_BxT) for x_BxT in rows))
      g1, g2, losses_N = jax.tree.map(lambda x: x / grad_accum, acc)
    new_params, new_opt = opt.update(g1, g2, state["opt"], params)
    need_g1 = opt.mode == "full"
    metrics = {
        "loss": jnp.sum(weights_N * losses_N),
        "head_loss": losses_N,
        "lr": opt.lr_base(state["step"]),
        "grad_norm_head1": (_global_norm(split(g1)[0]) if need_g1
                            else jnp.float32(0)),
        "grad_norm_heads": _global_norm(g2),
    }
  return {"step": state["step"] + 1, "params": new_params,
          "opt": new_opt}, metrics


def make_train_step(config: PythiaConfig, opt: DynamoOptimizer, mesh: Mesh,
                    shardings, *, grad_accum: int = 1,
                    head_weights: tuple[float, ...] | None = None):
  """`train_step` jitted: (state, batch) -> (state, metrics), with explicit
  in/out shardings and the state donated."""
  rep = replicated(mesh)
  # One sharding for every array of the batch (a pytree prefix): tokens,
  # segment_ids and, for instruction tuning, loss_mask.
  batch_sh = batch_sharding(mesh)
  step = functools.partial(train_step, config, opt, mesh,
                           grad_accum=grad_accum, head_weights=head_weights)
  return jax.jit(step, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, rep), donate_argnums=0)


def _global_norm(tree):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
