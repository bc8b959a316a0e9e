"""Tokenizers: the model's own (transformers / tokenizer.json) or raw bytes."""

from __future__ import annotations

import os

from dynamo_jax.errors import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, EOS = 256: no training, no files.

  For tiny from-scratch runs and smoke tests (models with vocab_size >= 257).
  """
  eos_token_id = 256
  vocab_size = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(
        "utf-8", errors="replace")

  def get_vocab(self) -> dict[str, int]:
    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab["<eos>"] = 256
    return vocab


def load_tokenizer(name_or_path: str):
  """"bytes", a directory with tokenizer files, or a hub id."""
  if name_or_path == "bytes":
    return ByteTokenizer()
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    return transformers.AutoTokenizer.from_pretrained(name_or_path)
  except (OSError, ValueError) as e:
    where = ("directory" if os.path.isdir(name_or_path) else "hub id")
    raise ConfigError(f"cannot load a tokenizer from {where} {name_or_path!r}: "
                      f"{e}") from None
