"""What to read for training: the `DataConfig` of one data source."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from dynamo_jax.errors import ConfigError, DynamoError
from dynamo_jax.errors import show_value as _show

SOURCES = ("tfds", "text", "jsonl", "tokens", "instructions")
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
      ids, documents separated by the EOS id) or "instructions" (Alpaca
      records for chat fine-tuning, dynamo_jax/chat/instructions.py: loss on
      response tokens only, whole examples per row).
    name: tfds dataset name, optionally with config and version
      ("tiny_shakespeare", "wiki40b/en:1.3.0").
    split: tfds split, slicing allowed ("train", "train[:97%]").
    field: the text field of each example (tfds) or record (jsonl).
    data_dir: tfds data directory; None for tfds's default.
    paths: files, directories (their files with the source's extension, in
      sorted order) or glob patterns, for the file sources; for
      "instructions": .json / .jsonl files, tfds:NAME[:SPLIT],
      hf:ORG/NAME[:SPLIT] or dynamo_jax:instructions (the project's set).
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
    heldout_every: "instructions": records k, 2k, ... (1-based) are held out
      for evaluation, never trained on; 0 holds none out.
    chat_template: "instructions": a Jinja chat template file; None takes
      the tokenizer's own, else dynamo_jax's default (chat/template.py).
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
  heldout_every: int = 0
  chat_template: str | None = None

  def __post_init__(self):
    # Types first, so the checks below compare like with like.
    if not isinstance(self.source, str) or self.source not in SOURCES:
      raise ConfigError(f"data.source must be one of {list(SOURCES)}, got "
                        f"{_show(self.source)}.")
    _check_str("name", self.name, optional=True)
    _check_str("split", self.split)
    _check_str("field", self.field)
    _check_str("data_dir", self.data_dir, optional=True)
    # A single path given as a string is a common slip; a list comes from
    # JSON. Either becomes a tuple so the config stays hashable.
    paths = self.paths
    if isinstance(paths, (str, os.PathLike)):
      paths = (paths,)
    if (not isinstance(paths, (list, tuple))
        or not all(isinstance(p, (str, os.PathLike)) and os.fspath(p)
                   and isinstance(os.fspath(p), str) for p in paths)):
      raise ConfigError(f"data.paths must be a list of file, directory or glob "
                        f"paths (strings), got {_show(self.paths)}.")
    object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
    for name in ("one_doc_per_line", "shuffle"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"data.{name} must be true or false, got "
                          f"{_show(getattr(self, name))}.")
    if (not isinstance(self.token_dtype, str)
        or self.token_dtype not in TOKEN_DTYPES):
      raise ConfigError(f"data.token_dtype must be one of {list(TOKEN_DTYPES)}"
                        f", got {_show(self.token_dtype)}.")
    _check_int("eos_id", self.eos_id, minimum=0, optional=True)
    _check_int("num_epochs", self.num_epochs, minimum=1, optional=True)
    _check_int("prefetch", self.prefetch, minimum=0)
    _check_int("heldout_every", self.heldout_every, minimum=0)
    _check_str("chat_template", self.chat_template, optional=True)
    if self.source != "instructions" and (self.heldout_every
                                          or self.chat_template):
      raise ConfigError("data.heldout_every and data.chat_template apply to "
                        "data.source 'instructions' only.")
    if self.source == "tfds" and not self.name:
      raise ConfigError("data.source 'tfds' needs a dataset name (data.name).")
    if self.source != "tfds" and not self.paths:
      raise ConfigError(
          f"data.source {self.source!r} needs data.paths (files, directories "
          "or glob patterns).")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["paths"] = list(self.paths)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    if not isinstance(d, Mapping):
      raise ConfigError(f"data must be an object of DataConfig keys, got "
                        f"{_show(d)}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields, key=str)
    if unknown:
      raise ConfigError(
          f"unknown DataConfig keys {unknown}; known keys: {sorted(fields)}.")
    if "source" not in d:
      raise ConfigError(f"data.source is missing; set it to one of "
                        f"{list(SOURCES)}.")
    return cls(**d)


# Token ids and counts are int32 on the device.
_INT_MAX = 2**31 - 1


def _check_int(name: str, value: Any, *, minimum: int,
               optional: bool = False) -> None:
  if value is None and optional:
    return
  if (not isinstance(value, int) or isinstance(value, bool)
      or not minimum <= value <= _INT_MAX):
    raise ConfigError(
        f"data.{name} must be {'null or ' if optional else ''}an integer in "
        f"{minimum}..{_INT_MAX}, got {_show(value)}.")


def _check_str(name: str, value: Any, *, optional: bool = False) -> None:
  if value is None and optional:
    return
  if not isinstance(value, str) or not value:
    raise ConfigError(
        f"data.{name} must be {'null or ' if optional else ''}a non-empty "
        f"string, got {_show(value)}.")

