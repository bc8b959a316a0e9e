"""Loss, optimiser, configs and the train loop on one device."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dynamo_jax.errors import ConfigError, DynamoError
from dynamo_jax.model import tiny_config
from dynamo_jax.model.partitioning import activation_sharding, constrain
from dynamo_jax.training.config import (CONFIG_DIR, OptimConfig, load_config)
from dynamo_jax.training.loss import head_losses, shifted_targets
from dynamo_jax.training.optimizer import make_optimizer
from dynamo_jax.training.sharding import RULES, make_mesh
from tests.conftest import random_params


def test_shifted_targets_respect_documents():
  tokens = jnp.asarray([[10, 11, 12, 20, 21, 0]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])  # two documents, then padding
  t1, m1 = shifted_targets(tokens, seg, 1)
  np.testing.assert_array_equal(t1[0, :5], [11, 12, 20, 21, 0])
  np.testing.assert_array_equal(m1[0], [1, 1, 0, 1, 0, 0])
  t2, m2 = shifted_targets(tokens, seg, 2)
  np.testing.assert_array_equal(t2[0, :4], [12, 20, 21, 0])
  np.testing.assert_array_equal(m2[0], [1, 0, 0, 0, 0, 0])


def test_head_losses_against_numpy():
  config = tiny_config(vocab_size=37, hidden_size=16, num_heads=2,
                       intermediate_size=40, num_token_heads=3)
  params = random_params(config)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 37, size=(2, 9))
  seg = np.array([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2])
  losses, counts = head_losses(config, params, jnp.asarray(tokens), jnp.asarray(seg))
  logits = np.asarray(__import__("dynamo_jax").forward(config, params, tokens,
                                                       all_heads=True))
  for i in range(3):
    nll = []
    for b in range(2):
      for t in range(9 - (i + 1)):
        if seg[b, t] and seg[b, t + i + 1] == seg[b, t]:
          row = logits[i, b, t].astype(np.float64)
          logz = np.log(np.exp(row - row.max()).sum()) + row.max()
          nll.append(logz - row[tokens[b, t + i + 1]])
    assert counts[i] == len(nll)
    np.testing.assert_allclose(losses[i], np.mean(nll), rtol=1e-5)


def _adam_reference(grads, lr, b1=0.9, b2=0.95, eps=1e-8, wd=0.0, p=None):
  """Textbook AdamW, one parameter, a list of gradients -> list of updates."""
  m = v = 0.0
  updates = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    u = -lr[t - 1] * (step + wd * p[t - 1])
    updates.append(u)
  return updates


@pytest.mark.parametrize("mode", ["full", "heads_only"])
def test_three_learning_rates_against_hand_written_adam(mode):
  cfg = OptimConfig(lr_base=0.01, lr_heads_mult=100.0,
                    lr_stem_from_heads_mult=0.1, warmup_frac=0.25,
                    weight_decay=0.1, clip_norm=None, mode=mode)
  total = 8
  opt = make_optimizer(cfg, total)
  params = {"layers_0": jnp.asarray([0.5]), "heads_2": jnp.asarray([-0.3])}
  state = opt.init(params)
  rng = np.random.RandomState(0)
  g1s = rng.normal(size=(total, 2))  # [step, (base, head)]
  g2s = rng.normal(size=(total, 2))
  history = [params]
  for s in range(total):
    g1 = {"layers_0": jnp.asarray([g1s[s, 0]]), "heads_2": jnp.asarray([0.0])}
    g2 = {"layers_0": jnp.asarray([g2s[s, 0]]), "heads_2": jnp.asarray([g2s[s, 1]])}
    params, state = opt.update(g1, g2, state, params)
    history.append(params)

  def lr(peak):  # 2 warm-up steps (25% of 8) from 0, then cosine to 0
    out = []
    for s in range(total):
      if s < 2:
        out.append(peak * s / 2)
      else:
        out.append(peak * 0.5 * (1 + np.cos(np.pi * (s - 2) / (total - 2))))
    return out

  base = [float(h["layers_0"][0]) for h in history]
  head = [float(h["heads_2"][0]) for h in history]
  u_head = _adam_reference(g2s[:, 1], lr(1.0), wd=0.1, p=head)
  np.testing.assert_allclose(np.diff(head), u_head, rtol=1e-5, atol=1e-8)
  if mode == "full":
    u_b = _adam_reference(g1s[:, 0], lr(0.01), wd=0.1, p=base)
    u_mb = _adam_reference(g2s[:, 0], lr(0.001), wd=0.0, p=base)
    # Updates are read back as differences of float32 params near 0.5, whose
    # spacing is 6e-8: that, not the optimiser, bounds the absolute error.
    np.testing.assert_allclose(np.diff(base), np.add(u_b, u_mb), rtol=1e-5,
                               atol=1.2e-7)
  else:
    np.testing.assert_array_equal(np.diff(base), 0.0)


def test_every_config_loads():
  names = sorted(os.path.basename(p)[:-5] for p in
                 glob.glob(os.path.join(CONFIG_DIR, "*.json")))
  assert {"tiny-test", "dynamo-77m-t3", "dynamo-7.3b-t3"} <= set(names)
  paper_lr = {"dynamo-77m-t3": 1e-5, "dynamo-180m-t3": 6e-6,
              "dynamo-430m-t3": 3e-6, "dynamo-1.1b-t3": 2e-6,
              "dynamo-1.5b-t3": 2e-6, "dynamo-2.9b-t3": 1.6e-6,
              "dynamo-7.3b-t3": 1.2e-6}
  from dynamo_jax.training.loop import model_config
  for name in names:
    cfg = load_config(name)
    config = model_config(cfg)
    if name in paper_lr:
      assert config.num_token_heads == 3
      assert cfg.optim.lr_base == paper_lr[name]
      assert (cfg.optim.lr_heads_mult, cfg.optim.lr_stem_from_heads_mult) == (100, 0.1)
      assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.95, 1e-8)
      assert (cfg.seq_len, cfg.global_batch_size) == (2048, 64)
      assert cfg.optim.warmup_frac == 0.01


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown config keys \['optim.learning_rate'\]"):
    load_config("tiny-test", ["optim.learning_rate=1"])
  with pytest.raises(ConfigError, match="unknown config keys"):
    load_config("tiny-test", ["bogus=1"])
  with pytest.raises(ConfigError, match="no config 'nope'"):
    load_config("nope")
  with pytest.raises(ConfigError, match="key=value"):
    load_config("tiny-test", ["steps"])
  cfg = load_config("tiny-test", ["optim.lr_base=0.5", "steps=7"])
  assert cfg.optim.lr_base == 0.5 and cfg.steps == 7


def test_activation_constraints_only_inside_their_context():
  x = jnp.ones((4, 3, 8))
  assert constrain(x, ("batch", None, None)) is x  # no context: untouched
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])

  def f(x):
    with activation_sharding(mesh, RULES):
      return constrain(x * 2, ("batch", None, "mlp"))

  jaxpr = jax.make_jaxpr(f)(x)
  constraints = [e for e in jaxpr.eqns
                 if e.primitive.name == "sharding_constraint"]
  assert len(constraints) == 1
  assert constraints[0].params["sharding"] == NamedSharding(
      mesh, P(("data", "fsdp"), None, "tensor"))
  assert jax.make_jaxpr(lambda x: constrain(x, ("batch", None, None)))(
      x).eqns == []  # the context ended with f's trace
  with activation_sharding(mesh, RULES):
    with pytest.raises(ValueError, match="3 logical axes for an array of "
                       "rank 2"):
      constrain(jnp.ones((2, 2)), ("batch", None, None))
