"""DynaMo-Tn models: head 1 is the base Pythia; parameter overheads; causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.errors import ConfigError
from dynamo_jax.model import DYNAMO_PRESETS, Pythia, dynamo_preset, preset
from tests.conftest import random_params

# The paper's table of parameter overheads for the T3 suite (percent).
PAPER_OVERHEAD = {
    "dynamo-77m-t3": 8.95, "dynamo-180m-t3": 8.73, "dynamo-430m-t3": 6.22,
    "dynamo-1.1b-t3": 9.95, "dynamo-1.5b-t3": 7.12, "dynamo-2.9b-t3": 5.67,
    "dynamo-7.3b-t3": 5.87,
}


@pytest.mark.parametrize("name", sorted(DYNAMO_PRESETS))
def test_overheads_match_paper(name):
  t3 = dynamo_preset(name)
  base = preset(DYNAMO_PRESETS[name])
  counted = sum(int(np.prod(s.shape)) for s in
                jax.tree.leaves(dynamo_jax.model.param_shapes(t3)))
  assert counted == t3.num_params()
  overhead = 100 * (t3.num_params() - base.num_params()) / base.num_params()
  assert round(overhead, 2) == PAPER_OVERHEAD[name]


@pytest.fixture(scope="module")
def base():
  config = dynamo_jax.tiny_config(vocab_size=211, hidden_size=24, num_heads=3,
                                  intermediate_size=97, num_layers=3)
  return config, random_params(config)


def test_head1_is_the_base_model_exactly(base, rng):
  config, params = base
  t3, p3 = dynamo_jax.add_heads(config, params, 3, rng=0)
  assert t3.num_token_heads == 3 and set(p3) - set(params) == {"heads_2", "heads_3"}
  ids = rng.randint(0, 211, size=(2, 9))
  all_logits = np.asarray(dynamo_jax.forward(t3, p3, ids, all_heads=True))
  assert all_logits.shape == (3, 2, 9, 211)
  ref = np.asarray(dynamo_jax.forward(config, params, ids))
  np.testing.assert_array_equal(all_logits[0], ref)
  np.testing.assert_array_equal(np.asarray(dynamo_jax.forward(t3, p3, ids)), ref)
  assert np.abs(all_logits[1] - all_logits[0]).max() > 1e-3  # heads differ


def test_head_inputs_and_copy_init(base, rng):
  config, params = base
  ids = rng.randint(0, 211, size=(1, 7))
  t2, p2 = dynamo_jax.add_heads(config, params, 2, rng=0, init="copy")
  jax.tree.map(np.testing.assert_array_equal, p2["heads_2"], params["layers_2"])
  logits = np.asarray(dynamo_jax.forward(t2, p2, ids, all_heads=True))
  np.testing.assert_allclose(logits[1], logits[0], atol=1e-6)  # copy of layer L on the stem
  # Head 2 reads the stem: layer L's weights do not reach it...
  moved = {**p2, "layers_2": jax.tree.map(lambda x: x + 1.0, p2["layers_2"])}
  logits_moved = np.asarray(dynamo_jax.forward(t2, moved, ids, all_heads=True))
  np.testing.assert_array_equal(logits_moved[1], logits[1])
  # ...unless it reads the last layer (the paper's ablation).
  last = t2.replace(head_input="last")
  a = np.asarray(dynamo_jax.forward(last, p2, ids, all_heads=True))[1]
  b = np.asarray(dynamo_jax.forward(last, moved, ids, all_heads=True))[1]
  assert np.abs(a - b).max() > 1e-3


def test_add_heads_errors(base):
  config, params = base
  with pytest.raises(ConfigError, match="init 'zeros' unknown"):
    dynamo_jax.add_heads(config, params, 3, rng=0, init="zeros")
  with pytest.raises(ConfigError, match="n must be"):
    dynamo_jax.add_heads(config, params, 9, rng=0)


@pytest.mark.parametrize("head_input", ["stem", "last"])
def test_gradient_causality(base, rng, head_input):
  """Head i's logits at t have zero gradient w.r.t. inputs after t."""
  config, params = base
  t3, p3 = dynamo_jax.add_heads(config.replace(head_input=head_input), params,
                                3, rng=1)
  t = 11
  x = jnp.asarray(rng.normal(size=(1, t, 24)), jnp.float32)
  pos = jnp.arange(t)[None]

  def logits_at(x, head, q):
    hiddens, _ = Pythia(t3).apply({"params": p3}, x, pos, all_heads=True,
                                  method=Pythia.hidden_states_from_embeddings)
    logits = Pythia(t3).apply({"params": p3}, hiddens[head], method=Pythia.unembed)
    return logits[0, q].sum()

  for head in range(3):
    for q in (0, 4, 10):
      g = np.asarray(jax.grad(logits_at)(x, head, q))[0]
      assert np.all(g[q + 1:] == 0), (head, q)
      assert np.abs(g[:q + 1]).max() > 0
