"""The embedded default model: a small Pythia-architecture DynaMo-T3 trained
from scratch on public-domain English (Shakespeare, Milton, the King James
Bible), shipped inside the package so dynamo_jax works offline.

Its files, in dynamo_jax's own checkpoint format, sit beside this module:
dynamo_config.json, params.safetensors (bfloat16, upcast to float32 on load)
with checksums.json (each tensor's sha256, verified on load), tokenizer.json + tokenizer_config.json, cooc.npz (co-occurrence table) and
test_sample.npy (a fixed ~20k-token slice of the test split, for its test).
MODEL_CARD.md describes it; experiments/default_model/build.py rebuilds it.
"""

from __future__ import annotations

import os

from dynamo_jax.errors import CheckpointError

_REQUIRED = ("dynamo_config.json", "params.safetensors", "tokenizer.json")
TEST_SAMPLE_FILE = "test_sample.npy"


def default_model_dir() -> str:
  """The directory of the shipped artifact, checked to hold a model.

  Raises CheckpointError when its files are missing (a source checkout
  where the artifact was never built, or a broken install).
  """
  directory = os.path.dirname(os.path.abspath(__file__))
  missing = [f for f in _REQUIRED
             if not os.path.exists(os.path.join(directory, f))]
  if missing:
    raise CheckpointError(
        f"the embedded default model is incomplete in {directory} (missing "
        f"{missing}); rebuild it with `python experiments/default_model/"
        "build.py --out dynamo_jax/default_model`, or pass a model "
        "explicitly.")
  return directory
