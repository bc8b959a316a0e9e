"""sampling.draw_from_probs (the verified chain's and tree's draws) against
numpy: each draw is numpy's inverse CDF at the same uniform, and the draws
follow p (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.decoding.sampling import draw_from_probs, invert_cdf

_draw = jax.jit(draw_from_probs)


def _keys(count, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), count)


def test_each_draw_is_numpy_inverse_cdf():
  rng = np.random.default_rng(0)
  probs = rng.random((64, 37)).astype(np.float32)
  probs[:, ::3] = 0.0  # zeros among the entries
  probs[5] = 0.0
  probs[5, 36] = 0.25  # a single positive entry, last; rows not normalised
  keys = _keys(64)
  got = np.asarray(_draw(keys, jnp.asarray(probs)))
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys))
  for row in range(64):
    cdf = np.cumsum(probs[row].astype(np.float64))
    want = int(np.searchsorted(cdf, u[row] * cdf[-1], side="right"))
    assert got[row] == want, (row, got[row], want)
    assert probs[row, got[row]] > 0


def test_invert_cdf_ends_never_land_on_zeros():
  """u = 0 and u = 1 (u * total reaching the total) pick the first and the
  last token of positive probability, past leading and trailing zeros."""
  probs = jnp.asarray([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0],
                       [0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
  got = jax.jit(invert_cdf)(jnp.asarray([0.0, 0.0]), probs)
  np.testing.assert_array_equal(np.asarray(got), [2, 1])
  got = jax.jit(invert_cdf)(jnp.asarray([1.0, 1.0]), probs)
  np.testing.assert_array_equal(np.asarray(got), [4, 6])
  # Just below the boundary between tokens 2 and 4 of row 0.
  got = jax.jit(invert_cdf)(jnp.asarray([0.4999, 0.74]), probs)
  np.testing.assert_array_equal(np.asarray(got), [2, 1])


def test_draws_follow_p_chi_square():
  """8,000 draws from a 6-way law: chi-square against the expected counts
  below the 0.1% critical value (20.52 for 5 degrees of freedom), and a
  shifted law as a control that the test can fail."""
  p = np.array([0.05, 0.3, 0.0, 0.15, 0.4, 0.1], np.float32)
  draws = np.asarray(_draw(_keys(8000, seed=1),
                           jnp.asarray(np.tile(p, (8000, 1)))))
  counts = np.bincount(draws, minlength=6)
  assert counts[2] == 0
  live = p > 0

  def chi2(law):
    expected = 8000 * law[live]
    return float(np.sum((counts[live] - expected) ** 2 / expected))

  assert chi2(p) < 20.52
  shifted = np.array([0.1, 0.25, 0.0, 0.15, 0.4, 0.1])
  assert chi2(shifted) > 20.52
