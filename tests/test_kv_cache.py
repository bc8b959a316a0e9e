"""Cached decoding against the uncached forward pass (the reference)."""

import jax.numpy as jnp
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.decoding import ar_step
from dynamo_jax.model import forward_cached, init_cache, tiny_config
from tests.conftest import random_params

LOGIT_TOL = 1e-4
STEPS = 64


@pytest.fixture(scope="module")
def model():
  config = tiny_config(vocab_size=211, hidden_size=24, num_heads=3,
                       intermediate_size=97, max_position_embeddings=101)
  return config, random_params(config)


def test_greedy_cached_equals_uncached_over_64_steps(model, rng):
  config, params = model
  prompt = rng.randint(0, config.vocab_size, size=(3, 7))
  out = dynamo_jax.generate(config, params, prompt, max_new_tokens=STEPS,
                            greedy=True)
  assert out.tokens.shape == (3, STEPS) and out.tokens.dtype == np.int32
  assert out.forward_passes == STEPS
  np.testing.assert_array_equal(out.accepted, np.ones((3, STEPS)))
  # Reference: re-run the full uncached forward on the growing sequence. The
  # buffer is right-padded to a fixed length (one compile); causality makes
  # the logits at position t independent of the padding after it.
  seq = np.zeros((3, 7 + STEPS), np.int32)
  seq[:, :7] = prompt
  for t in range(7, 7 + STEPS):
    logits = np.asarray(dynamo_jax.forward(config, params, seq))
    seq[:, t] = logits[:, t - 1].argmax(-1)
  np.testing.assert_array_equal(out.tokens, seq[:, 7:])
  assert len(np.unique(out.tokens)) > 10  # not a degenerate repeat

  # Logits of the cached step, one token at a time, against the same forward.
  full = np.asarray(dynamo_jax.forward(config, params, seq[:, :-1]))
  cache = init_cache(config, 3, seq.shape[1])
  logits, cache = ar_step(config, params, cache, jnp.asarray(seq[:, :7]), None)
  got = [np.asarray(logits)]
  for t in range(7, seq.shape[1] - 1):
    logits, cache = ar_step(config, params, cache, jnp.asarray(seq[:, t:t + 1]), None)
    got.append(np.asarray(logits))
  assert np.abs(np.concatenate(got, axis=1) - full).max() <= LOGIT_TOL


def test_chunks_with_per_row_lengths(model, rng):
  """Chunks of several tokens, rows advancing by different amounts."""
  config, params = model
  b, total = 4, 40
  seqs = rng.randint(0, config.vocab_size, size=(b, total + 8))
  cache = init_cache(config, b, total + 8)
  pos = np.zeros(b, int)
  collected = [dict() for _ in range(b)]
  step = 0
  while pos.min() < total:
    lengths = rng.randint(1, 5, size=b)  # 1..4 valid tokens of a 4-token chunk
    lengths[pos >= total] = 0  # finished rows idle (a length of 0 is valid)
    chunk = np.stack([seqs[r, pos[r]:pos[r] + 4] for r in range(b)])
    logits, cache = forward_cached(config, params, cache, jnp.asarray(chunk),
                                   jnp.asarray(lengths, jnp.int32))
    for r in range(b):
      for i in range(lengths[r]):
        collected[r][pos[r] + i] = np.asarray(logits[r, i])
    pos += lengths
    step += 1
  np.testing.assert_array_equal(np.asarray(cache["end"]), pos)
  for r in range(b):
    ref = np.asarray(dynamo_jax.forward(config, params, seqs[r:r + 1, :pos[r]]))[0]
    got = np.stack([collected[r][t] for t in range(pos[r])])
    assert np.abs(got - ref).max() <= LOGIT_TOL


def test_sampling_is_seeded_and_temperature_matters(model, rng):
  config, params = model
  prompt = rng.randint(0, config.vocab_size, size=(2, 5))
  a = dynamo_jax.generate(config, params, prompt, max_new_tokens=20, seed=1)
  b = dynamo_jax.generate(config, params, prompt, max_new_tokens=20, seed=1)
  c = dynamo_jax.generate(config, params, prompt, max_new_tokens=20, seed=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  cold = dynamo_jax.generate(config, params, prompt, max_new_tokens=20,
                             temperature=1e-4, seed=3)
  greedy = dynamo_jax.generate(config, params, prompt, max_new_tokens=20,
                               greedy=True)
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)
