"""`dynamo_jax.load`: a model, its tokenizer and its co-occurrence table."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dynamo_jax.convert import native
from dynamo_jax.convert.hf import from_hf
from dynamo_jax.convert.sources import resolve
from dynamo_jax.errors import CheckpointError
from dynamo_jax.model.config import PythiaConfig

COOC_FILE = "cooc.npz"


@dataclasses.dataclass(frozen=True)
class Model:
  config: PythiaConfig
  params: Any
  tokenizer: Any
  cooc: Any = None  # a CoocTable, or None when the checkpoint has none


def load(path_or_id: str | None = None, *, revision: str | None = None,
         dtype=None) -> Model:
  """Loads a dynamo_jax checkpoint directory (its tokenizer files and, when
  present, its co-occurrence table cooc.npz), or an HF GPT-NeoX checkpoint
  directory or hub id (with a DynaMo export's token heads, see
  convert/hf.py; a table when the directory holds cooc.npz).

  `path_or_id=None` loads the embedded default model (a small DynaMo-T3
  trained here on Shakespeare, Milton and the KJV Bible; see its
  MODEL_CARD.md), in float32 unless `dtype` says otherwise.

  Raises CheckpointError (or ConfigError) naming the file, and the tensor
  when one is damaged (checksum mismatch, non-finite or non-float values).
  """
  if path_or_id is None:
    from dynamo_jax.default_model import default_model_dir  # pylint: disable=import-outside-toplevel
    directory = default_model_dir()
    dtype = dtype or "float32"
  else:
    directory = resolve(path_or_id, revision)
  # Checked first: loading the weights of a large model takes a while.
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    raise CheckpointError(f"{directory} has no tokenizer.json; copy the "
                          "model's tokenizer files next to its weights.")
  if native.is_native(directory):
    config, params = native.load(directory, dtype=dtype)
  else:
    config, params = from_hf(directory, dtype=dtype)
  from dynamo_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = load_tokenizer(directory)
  cooc = None
  if os.path.exists(os.path.join(directory, COOC_FILE)):
    from dynamo_jax import cooc as cooc_lib  # pylint: disable=import-outside-toplevel
    cooc = cooc_lib.load(os.path.join(directory, COOC_FILE))
    cooc.check_compatible(vocab_hash=cooc_lib.vocab_hash(tokenizer),
                          vocab_size=config.vocab_size,
                          num_heads=config.num_token_heads)
  return Model(config=config, params=params, tokenizer=tokenizer, cooc=cooc)
