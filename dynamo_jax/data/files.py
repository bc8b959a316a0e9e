"""Local file sources: .txt, .jsonl, and pre-tokenized .npy / .bin token ids.

Every source is a random-access sequence of documents: `len(source)` and
`source.read(indices) -> [str | int32 array]`. Files holding many documents
(.jsonl, .txt with one document per line, token files) are indexed once, at
open, by one sequential scan for the separators (newlines, or the EOS id)
over a memory map, so no file is ever loaded whole; a document is then read
by its byte or token span. The index costs 16 bytes per document.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from dynamo_jax.data import corpus
from dynamo_jax.data.config import DataConfig, DataError

_EXTENSIONS = {"text": (".txt",), "jsonl": (".jsonl",),
               "tokens": (".npy", ".bin")}
_SCAN_CHUNK = 1 << 24  # elements per step of an index scan: bounded memory


def expand_paths(paths: Sequence[str], source: str) -> list[str]:
  """Files named by `paths`: files, directories (their files with the
  source's extensions, sorted), glob patterns (sorted matches) or named
  corpora (`corpus:NAME`, fetched into the cache on first use)."""
  extensions = _EXTENSIONS[source]
  files = []
  for path in paths:
    path = corpus.resolve_path(path)
    if glob.has_magic(path):
      matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
      if not matches:
        raise DataError(f"no file matches the pattern {path!r}.")
      files.extend(matches)
    elif os.path.isdir(path):
      matches = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(extensions))
      if not matches:
        raise DataError(f"directory {path!r} holds no {'/'.join(extensions)} "
                        "file.")
      files.extend(matches)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise DataError(f"data file {path!r} does not exist.")
  return files


def open_file_source(cfg: DataConfig, eos_id: int) -> "ConcatSource":
  files = expand_paths(cfg.paths, cfg.source)
  if cfg.source == "tokens":
    parts = [TokenFile(f, cfg.token_dtype, eos_id) for f in files]
  elif cfg.source == "jsonl":
    parts = [LineFile(f, field=cfg.field) for f in files]
  elif cfg.one_doc_per_line:
    parts = [LineFile(f) for f in files]
  else:
    parts = [WholeFile(f) for f in files]
  return ConcatSource(parts)


class ConcatSource:
  """Files one after the other: document i of the whole is found by bisecting
  the running document counts."""

  def __init__(self, parts):
    self._parts = parts
    self._bounds = np.cumsum([0] + [len(p) for p in parts])

  def __len__(self) -> int:
    return int(self._bounds[-1])

  def read(self, indices: Sequence[int]) -> list:
    part_ids = np.searchsorted(self._bounds, indices, side="right") - 1
    return [self._parts[p].read_one(int(i - self._bounds[p]))
            for i, p in zip(indices, part_ids)]


class WholeFile:
  """A .txt file that is one document."""

  def __init__(self, path: str):
    self.path = path

  def __len__(self) -> int:
    return 1

  def read_one(self, i: int) -> str:
    del i  # The only document.
    with open(self.path, "rb") as f:
      return f.read().decode("utf-8", errors="replace")


class LineFile:
  """A file with one document per non-empty line: plain text, or with
  `field` set, a JSON object per line whose `field` holds the text."""

  def __init__(self, path: str, field: str | None = None):
    self.path = path
    self.field = field
    ends = _find(path, np.uint8, ord("\n"))
    self._starts, self._ends = _spans(ends, os.path.getsize(path))
    if field is not None and len(self):
      self.read_one(0)  # A wrong field fails at open, not mid-training.

  def __len__(self) -> int:
    return len(self._starts)

  def read_one(self, i: int) -> str:
    start, end = int(self._starts[i]), int(self._ends[i])
    with open(self.path, "rb") as f:
      f.seek(start)
      # Invalid UTF-8 is replaced, not raised: one bad byte in a multi-GB
      # corpus must not stop a run hours in.
      line = f.read(end - start).decode("utf-8", errors="replace")
    if self.field is None:
      return line.rstrip("\r")
    try:
      return record_text(line, self.field)
    except ValueError as e:
      raise DataError(f"{self.path}: record {i} (bytes {start}..{end}) "
                      f"{e}.") from None


def record_text(line: str, field: str) -> str:
  """The string in `field` of one JSON-lines record ("" for a blank line).

  Raises ValueError saying what is wrong (callers add where).
  """
  if not line.strip():
    return ""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"is not valid JSON: {e}") from None
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"has no field {field!r}; available fields: {keys}")
  text = record[field]
  if not isinstance(text, str):
    raise ValueError(f"field {field!r} is a {type(text).__name__}, not a "
                     "string")
  return text


class TokenFile:
  """Token ids in a .npy (its own dtype) or raw .bin (`dtype`) file, with
  documents separated by `eos_id`. Read through a memory map."""

  def __init__(self, path: str, dtype: str, eos_id: int):
    self.path = path
    if path.endswith(".npy"):
      try:
        self._tokens = np.load(path, mmap_mode="r")
      except ValueError as e:
        raise DataError(f"{path} is not a readable .npy file: {e}") from e
      if self._tokens.ndim != 1 or self._tokens.dtype.kind not in "iu":
        raise DataError(f"{path} holds a {self._tokens.dtype} array of shape "
                        f"{self._tokens.shape}; expected 1-D integer token "
                        "ids.")
    else:
      itemsize = np.dtype(dtype).itemsize
      size = os.path.getsize(path)
      if size % itemsize:
        raise DataError(f"{path} has {size} bytes, not a multiple of "
                        f"{itemsize}: is token_dtype={dtype!r} right?")
      # np.memmap refuses empty files; an empty array reads the same.
      self._tokens = (np.memmap(path, dtype, mode="r") if size
                      else np.zeros(0, dtype))
    if eos_id > np.iinfo(self._tokens.dtype).max:
      raise DataError(f"eos_id {eos_id} does not fit in {path}'s "
                      f"{self._tokens.dtype} token ids.")
    self._starts, self._ends = _spans(
        _find(self._tokens, None, eos_id), len(self._tokens))

  def __len__(self) -> int:
    return len(self._starts)

  def read_one(self, i: int) -> np.ndarray:
    # A view of the memory map, not a copy: the packer copies it row by row.
    return self._tokens[self._starts[i]:self._ends[i]]


def _find(path_or_array, dtype, value: int) -> np.ndarray:
  """Positions of `value` in a file (read as `dtype`) or an array, scanned
  in bounded chunks."""
  if isinstance(path_or_array, str):
    if not os.path.getsize(path_or_array):
      return np.zeros(0, np.int64)
    data = np.memmap(path_or_array, dtype, mode="r")
  else:
    data = path_or_array
  found = [np.flatnonzero(data[i:i + _SCAN_CHUNK] == value) + i
           for i in range(0, len(data), _SCAN_CHUNK)]
  return np.concatenate(found) if found else np.zeros(0, np.int64)


def _spans(separators: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) of the non-empty pieces between separators."""
  starts = np.concatenate([[0], separators + 1]).astype(np.int64)
  ends = np.concatenate([separators, [size]]).astype(np.int64)
  keep = ends > starts
  return starts[keep], ends[keep]
