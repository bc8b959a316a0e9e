"""Opt-in: the real EleutherAI/pythia-70m from the hub against transformers.

Run with `pytest --run-slow` (or DYNAMO_RUN_SLOW=1) on a machine with
internet; it skips, saying why, when the hub cannot be reached.
"""

import numpy as np
import pytest

import dynamo_jax
from tests.conftest import torch_logits

REPO = "EleutherAI/pythia-70m"
# Real logits reach |30| and sum 512-wide float32 products in a different
# order than torch; 1e-3 absolute is still ~1e-5 relative.
TOL = 1e-3


def _hub_reachable() -> str | None:
  try:
    import huggingface_hub
    huggingface_hub.model_info(REPO, timeout=10)
    return None
  except Exception as e:  # noqa: BLE001 - any failure means "no hub"
    return f"{type(e).__name__}: {str(e)[:200]}"


@pytest.mark.slow
@pytest.mark.parametrize("revision", [None, "step143000"])
def test_real_pythia_70m(revision):
  why = _hub_reachable()
  if why:
    pytest.skip(f"Hugging Face Hub unreachable ({why})")
  import transformers
  config, params = dynamo_jax.from_hf(REPO, revision=revision)
  assert config == dynamo_jax.preset("pythia-70m")
  tok = transformers.AutoTokenizer.from_pretrained(REPO)
  ids = np.asarray([tok.encode("The capital of France is Paris. The capital of")])
  ref_model = transformers.GPTNeoXForCausalLM.from_pretrained(
      REPO, revision=revision).eval()
  ref = torch_logits(ref_model, ids)
  ours = np.asarray(dynamo_jax.forward(config, params, ids))
  assert np.abs(ours - ref).max() <= TOL
  out = dynamo_jax.generate(config, params, ids, max_new_tokens=8, greedy=True)
  ref_tokens = ref_model.generate(
      __import__("torch").as_tensor(ids), max_new_tokens=8, min_new_tokens=8,
      do_sample=False)
  np.testing.assert_array_equal(out.tokens[0], ref_tokens[0, ids.shape[1]:].numpy())
