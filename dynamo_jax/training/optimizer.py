"""DynaMo's optimiser: AdamW with three learning-rate groups.

Parameters split into the base (stem + head 1, which includes the shared
final layer norm and embed_out) and the new heads (`heads_{i}`). The train
step provides two gradients: g1 of head 1's loss and g2 of heads 2..n's loss.

  base  += AdamW_B(g1[base];  LR_B)  + Adam_MB(g2[base]; LR_MB)
  heads += AdamW_M(g2[heads]; LR_M)

Adam normalises its input, so scaling g2[base] by 0.1 would not scale its
step: the faithful reading of LR_MB is a separate Adam update with its own
moments. Decisions where the paper is silent (documented defaults):
  - the shared final layer norm and embed_out count as base: their gradient
    from heads 2..n takes LR_MB;
  - weight decay (default 0.01, Pythia's) is applied once per parameter: by
    the LR_B update on the base and the LR_M update on the heads;
  - g1 and g2 are clipped to `clip_norm` each, before their Adam updates.
In mode "heads_only" only the heads' update runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dynamo_jax.training.config import OptimConfig

Params = dict[str, Any]


def split(params: Params) -> tuple[Params, Params]:
  """(base, heads): heads are the `heads_{i}` subtrees."""
  base = {k: v for k, v in params.items() if not k.startswith("heads_")}
  heads = {k: v for k, v in params.items() if k.startswith("heads_")}
  return base, heads


def schedule(peak: float, total_steps: int, warmup_frac: float):
  """Linear warm-up over warmup_frac of the steps to `peak`, cosine to 0."""
  warmup = max(1, round(warmup_frac * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


class DynamoOptimizer(NamedTuple):
  """Three optax transforms; `update` takes both gradients."""
  base: optax.GradientTransformation
  stem_from_heads: optax.GradientTransformation
  heads: optax.GradientTransformation
  mode: str
  lr_base: optax.Schedule

  def init(self, params: Params) -> dict[str, Any]:
    base, heads = split(params)
    state = {"heads": self.heads.init(heads)}
    if self.mode == "full":
      state["base"] = self.base.init(base)
      state["stem_from_heads"] = self.stem_from_heads.init(base)
    return state

  def update(self, g1: Params, g2: Params, state, params: Params):
    """Returns (new params, new state)."""
    base, heads = split(params)
    g1_base, _ = split(g1)
    g2_base, g2_heads = split(g2)
    new_state = dict(state)
    u_heads, new_state["heads"] = self.heads.update(g2_heads, state["heads"], heads)
    heads = optax.apply_updates(heads, u_heads)
    if self.mode == "full":
      u_b, new_state["base"] = self.base.update(g1_base, state["base"], base)
      u_mb, new_state["stem_from_heads"] = self.stem_from_heads.update(
          g2_base, state["stem_from_heads"], base)
      base = optax.apply_updates(base, jax.tree.map(jnp.add, u_b, u_mb))
    return {**base, **heads}, new_state


def _adamw(cfg: OptimConfig, lr: optax.Schedule, decay: bool):
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if decay and cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> DynamoOptimizer:
  lr_b = schedule(cfg.lr_base, total_steps, cfg.warmup_frac)
  lr_m = schedule(cfg.lr_base * cfg.lr_heads_mult, total_steps, cfg.warmup_frac)
  lr_mb = schedule(cfg.lr_base * cfg.lr_stem_from_heads_mult, total_steps,
                   cfg.warmup_frac)
  return DynamoOptimizer(base=_adamw(cfg, lr_b, decay=True),
                         stem_from_heads=_adamw(cfg, lr_mb, decay=False),
                         heads=_adamw(cfg, lr_m, decay=True),
                         mode=cfg.mode, lr_base=lr_b)
