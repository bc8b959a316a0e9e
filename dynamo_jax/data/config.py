"""What to read for training: the `DataConfig` of one data source."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dynamo_jax.errors import ConfigError, DynamoError

SOURCES = ("tfds", "text", "jsonl", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")


class DataError(DynamoError):
  """A data source that is missing, malformed, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """One training data source. Frozen; `from_dict` rejects unknown keys.

  Attributes:
    source: "tfds" (a TensorFlow Datasets text dataset, read through
      `tfds.data_source`), "text" (.txt files), "jsonl" (.jsonl files, one
      JSON object per line) or "tokens" (pre-tokenized .npy / raw .bin token
      ids, documents separated by the EOS id).
    name: tfds dataset name, optionally with config and version
      ("tiny_shakespeare", "wiki40b/en:1.3.0").
    split: tfds split, slicing allowed ("train", "train[:97%]").
    field: the text field of each example (tfds) or record (jsonl).
    data_dir: tfds data directory; None for tfds's default.
    paths: files, directories (their files with the source's extension, in
      sorted order) or glob patterns, for the file sources.
    one_doc_per_line: for "text": every non-empty line is a document, instead
      of every file being one.
    token_dtype: dtype of raw .bin token files ("uint16" or "uint32"); .npy
      files carry their own.
    eos_id: the id appended to every document, and the separator inside
      "tokens" files; None takes the tokenizer's EOS.
    shuffle: shuffle the documents (a fresh permutation every epoch).
    num_epochs: passes over the data; None repeats forever.
    prefetch: batches prepared ahead in a background thread; 0 prepares
      each batch on `next`.
  """

  source: str
  name: str | None = None
  split: str = "train"
  field: str = "text"
  data_dir: str | None = None
  paths: tuple[str, ...] = ()
  one_doc_per_line: bool = False
  token_dtype: str = "uint16"
  eos_id: int | None = None
  shuffle: bool = True
  num_epochs: int | None = None
  prefetch: int = 2

  def __post_init__(self):
    # A single path given as a string is a common slip; a list comes from
    # JSON. Either becomes a tuple so the config stays hashable.
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,))
    else:
      object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    if self.source not in SOURCES:
      raise ConfigError(
          f"DataConfig.source must be one of {SOURCES}, got {self.source!r}.")
    if self.source == "tfds" and not self.name:
      raise ConfigError("DataConfig(source='tfds') needs a dataset `name`.")
    if self.source != "tfds" and not self.paths:
      raise ConfigError(
          f"DataConfig(source={self.source!r}) needs `paths` (files, "
          "directories or glob patterns).")
    if not self.field:
      raise ConfigError("DataConfig.field must be a non-empty field name.")
    if self.token_dtype not in TOKEN_DTYPES:
      raise ConfigError(f"DataConfig.token_dtype must be one of "
                        f"{TOKEN_DTYPES}, got {self.token_dtype!r}.")
    _check_int("eos_id", self.eos_id, minimum=0, optional=True)
    _check_int("num_epochs", self.num_epochs, minimum=1, optional=True)
    _check_int("prefetch", self.prefetch, minimum=0)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["paths"] = list(self.paths)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError(
          f"unknown DataConfig keys {unknown}; known keys: {sorted(fields)}.")
    if "source" not in d:
      raise ConfigError(f"DataConfig needs `source`, one of {SOURCES}.")
    return cls(**d)


def _check_int(name: str, value: Any, *, minimum: int,
               optional: bool = False) -> None:
  if value is None and optional:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(
        f"DataConfig.{name} must be an integer >= {minimum}"
        f"{' or None' if optional else ''}, got {value!r}.")
