"""Input files for counting: token-id files and text files, as documents.

Token-id files hold one stream of ids each: `.npy` (a 1-D integer array) or
`.bin` (raw ids of a given dtype, uint16 by default, as in GPT-NeoX data).
A file is one document, unless a separator id is given: then each occurrence
of it ends a document (and is that document's last token), so no n-gram
spans it. Text files need a tokenizer: `.txt` holds one document per
non-empty line, `.jsonl` one per line in the field `text_key`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np

from dynamo_jax.data.files import record_text
from dynamo_jax.errors import InputError

TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt", ".jsonl")
_TEXT_BATCH = 1024  # documents per tokenizer call


def check_paths(paths: list[str]) -> None:
  """Raises InputError for a missing file or an unknown suffix."""
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"no data file {path}.")
    if not path.endswith(TOKEN_SUFFIXES + TEXT_SUFFIXES):
      raise InputError(f"{path}: unknown data file type; expected one of "
                       f"{', '.join(TOKEN_SUFFIXES + TEXT_SUFFIXES)}.")


def is_text(path: str) -> bool:
  return path.endswith(TEXT_SUFFIXES)


def progress_bytes(path: str, bin_dtype: str = "uint16") -> int:
  """The bytes that reading `path` reports through `advance`."""
  if is_text(path):
    return os.path.getsize(path)
  return token_array(path, bin_dtype).nbytes


def token_array(path: str, bin_dtype: str = "uint16") -> np.ndarray:
  """The 1-D integer token ids of a .npy or raw .bin file (memory-mapped),
  or an InputError naming the file."""
  if path.endswith(".bin"):
    size = os.path.getsize(path)
    if size == 0 or size % np.dtype(bin_dtype).itemsize:
      raise InputError(f"{path}: {size} bytes is not a whole number of "
                       f"{bin_dtype} token ids (empty or truncated .bin?).")
    return np.memmap(path, dtype=np.dtype(bin_dtype), mode="r")
  try:
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    reason = "empty file" if os.path.getsize(path) == 0 else str(e) or type(e).__name__
    raise InputError(f"{path}: not a readable .npy file ({reason}).") from None
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise InputError(f"{path}: expected a 1-D integer array of token ids, "
                     f"got {ids.dtype} {ids.shape}; flatten it first.")
  return ids


def read_tokens(path: str, *, bin_dtype: str = "uint16",
                doc_sep: int | None = None, chunk_tokens: int = 1 << 22,
                advance: Callable[[int], None] | None = None
                ) -> Iterator[tuple[np.ndarray, bool]]:
  """Yields (ids, end_of_document) pieces of a token-id file, in order.

  `advance` is called with the bytes of the file consumed so far (for a
  progress bar).
  """
  ids = token_array(path, bin_dtype)
  for start in range(0, ids.size, chunk_tokens):
    chunk = np.asarray(ids[start:start + chunk_tokens])
    last = start + chunk_tokens >= ids.size
    cuts = [] if doc_sep is None else list(np.flatnonzero(chunk == doc_sep) + 1)
    begin = 0
    for cut in cuts:
      yield chunk[begin:cut], True
      begin = cut
    if begin < chunk.size:  # else the chunk ended with a separator
      yield chunk[begin:], last
    if advance is not None:
      advance(chunk.nbytes)
  if ids.size == 0:
    yield ids[:0], True


def read_text(path: str, tokenizer, *, text_key: str = "text",
              advance: Callable[[int], None] | None = None
              ) -> Iterator[tuple[np.ndarray, bool]]:
  """Yields (ids, True) per document of a .txt or .jsonl file."""
  batch, batch_bytes = [], 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      batch_bytes += len(raw)
      text = _document(path, line_no, raw, text_key)
      if text:
        batch.append(text)
      if len(batch) >= _TEXT_BATCH:
        yield from _encode(tokenizer, batch)
        if advance is not None:
          advance(batch_bytes)
        batch, batch_bytes = [], 0
  yield from _encode(tokenizer, batch)
  if advance is not None:
    advance(batch_bytes)


def _document(path: str, line_no: int, raw: bytes, text_key: str) -> str:
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise InputError(f"{path}:{line_no}: not UTF-8 text.") from None
  if path.endswith(".txt"):
    return line.rstrip("\r\n")
  try:
    return record_text(line, text_key)
  except ValueError as e:
    raise InputError(f"{path}:{line_no}: the record {e} (--text-key chooses "
                     "the field).") from None


def _encode(tokenizer, texts: list[str]):
  if not texts:
    return
  for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
    yield np.asarray(enc.ids, np.int64), True
