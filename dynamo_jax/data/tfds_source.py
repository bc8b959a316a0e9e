"""TensorFlow Datasets text datasets, read without TensorFlow.

`tfds.data_source` gives random access to a prepared split (ArrayRecord
files): examples are read and decoded one by one on request, never loaded
whole, and reading needs no TensorFlow. `tfds.data_source` prepares a dataset
that is not there yet (download and ArrayRecord build) when the machine has
internet. A split prepared only as TFRecord cannot be read this way; tfds's
error then says how to convert it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dynamo_jax.data.config import DataConfig, DataError


class TfdsSource:
  """The text field of every example of one tfds split, by index."""

  def __init__(self, cfg: DataConfig):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise DataError("DataConfig(source='tfds') needs tensorflow-datasets: "
                      "pip install tensorflow-datasets") from e
    self.name = cfg.name
    self.field = cfg.field
    self._examples = tfds.data_source(cfg.name, split=cfg.split,
                                      data_dir=cfg.data_dir)
    fields = list(self._examples.dataset_info.features.keys())
    if cfg.field not in fields:
      raise DataError(f"tfds dataset {cfg.name!r} has no field {cfg.field!r}; "
                      f"available fields: {fields}.")

  def __len__(self) -> int:
    return len(self._examples)

  def read(self, indices: Sequence[int]) -> list[str]:
    # One by one rather than `__getitems__`: that is broken under
    # tfds.testing.mock_data, and a text record is one small read anyway.
    return [self._text(self._examples[int(i)], i) for i in indices]

  def _text(self, example, index: int) -> str:
    value = example[self.field]
    if isinstance(value, np.ndarray) and value.shape == ():
      value = value.item()
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
      return value
    raise DataError(f"tfds dataset {self.name!r} example {index}: field "
                    f"{self.field!r} holds {type(value).__name__}, not text.")
