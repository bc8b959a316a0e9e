"""One interface over the tokenizers the pipeline accepts, and the EOS id."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from dynamo_jax.data.config import DataError

# Tried in order on a bare `tokenizers.Tokenizer`, which has no notion of EOS.
# The first is Pythia's (GPT-NeoX-20B tokenizer).
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


def make_encoder(tokenizer: Any) -> Callable[[Sequence[str]], list[np.ndarray]]:
  """Returns `encode(texts) -> [int32 ids]` for one of the accepted kinds.

  Accepted: a `tokenizers.Tokenizer`, a transformers tokenizer, or any object
  with `encode(text) -> list[int]`. Special tokens (BOS and the like) are not
  added: the pipeline appends EOS itself, as Pythia's pre-training did.
  """
  import tokenizers  # A core dependency; imported here to keep import light.
  if isinstance(tokenizer, tokenizers.Tokenizer):
    def encode_rust(texts):
      encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
      return [np.asarray(e.ids, np.int32) for e in encodings]
    return encode_rust
  if _is_transformers(tokenizer):
    def encode_hf(texts):
      ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
      return [np.asarray(x, np.int32) for x in ids]
    return encode_hf
  if callable(getattr(tokenizer, "encode", None)):
    return lambda texts: [np.asarray(tokenizer.encode(t), np.int32)
                          for t in texts]
  raise DataError(
      f"cannot tokenize with {type(tokenizer).__name__}: pass a "
      "tokenizers.Tokenizer, a transformers tokenizer, or an object with "
      "encode(text) -> list[int].")


def resolve_eos_id(tokenizer: Any, eos_id: int | None) -> int:
  """The id appended after every document: `eos_id` if given, else the
  tokenizer's own EOS."""
  if eos_id is not None:
    return eos_id
  found = getattr(tokenizer, "eos_token_id", None)
  if isinstance(found, int) and found >= 0:
    return found
  token_to_id = getattr(tokenizer, "token_to_id", None)
  if callable(token_to_id):
    for token in _EOS_TOKENS:
      found = token_to_id(token)
      if found is not None:
        return int(found)
  raise DataError(
      f"no EOS id: the tokenizer ({type(tokenizer).__name__}) has none "
      f"(looked for eos_token_id and the tokens {list(_EOS_TOKENS)}); set "
      "DataConfig.eos_id.")


def _is_transformers(tokenizer: Any) -> bool:
  # By module rather than isinstance so that transformers (slow to import) is
  # never imported for the other kinds.
  return any(c.__module__.startswith("transformers.")
             for c in type(tokenizer).__mro__)
