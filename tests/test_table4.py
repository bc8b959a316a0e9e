"""Table 4: parameter overheads against the paper's and a direct count, and
the projection's arithmetic and labels on a tiny timed shape."""

import math

import numpy as np
import pytest

from dynamo_jax.evaluation import table4
from dynamo_jax.model.config import DYNAMO_PRESETS, dynamo_preset


@pytest.mark.parametrize("name", sorted(DYNAMO_PRESETS))
def test_overhead_matches_formula_and_paper(name):
  config = dynamo_preset(name)
  base, extra = table4.parameter_counts(config)
  d, n = config.hidden_size, config.num_token_heads
  assert extra == (n - 1) * (12 * d * d + 13 * d)  # DYNAMO.md section 1
  # The paper rounds to two decimals.
  assert 100 * extra / base == pytest.approx(table4.PAPER[name][0], abs=0.006)


def test_projection_arithmetic_and_labels():
  table = table4.build_table(None, names=["dynamo-77m-t3", "dynamo-7.3b-t3"],
                             measured_tpp=2.0, max_weight_gb=0.5, repeats=1,
                             new_tokens=2, progress=False)
  assert table["kind"] == "projection" and "projection" in table["note"]
  small, big = table["rows"]
  assert small["projected_speedup"] == pytest.approx(2.0 / small["pass_price"])
  assert small["pass_price"] == pytest.approx(
      small["dynamo_eps1_seconds"] / small["ar_seconds"])
  assert math.isfinite(small["pass_price"]) and small["pass_price"] > 0
  assert "projected_speedup" not in big and "GB of bf16" in big["not_timed"]
  text = table4.markdown(table)
  assert "(projection)" in text and "not timed" in text
  np.testing.assert_allclose(big["overhead_pct"], 5.87, atol=0.006)
