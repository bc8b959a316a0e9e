"""N-gram keys: one uint64 per contiguous n-gram, mixed-radix in vocab_size.

The n-gram (x_1, ..., x_m) has key sum_i x_i * V**(m - i), so sorting keys
sorts n-grams lexicographically and the (m-1)-gram prefix of a key is
key // V. Keys of one order are only compared with keys of the same order.
"""

from __future__ import annotations

import numpy as np

from dynamo_jax.errors import InputError

KEY_DTYPE = np.uint64
_KEY_LIMIT = 2**64


def check_fits(vocab_size: int, max_order: int) -> None:
  """Raises InputError unless every n-gram up to max_order has a uint64 key."""
  if vocab_size < 1:
    raise InputError(f"vocab_size must be >= 1, got {vocab_size}.")
  if max_order < 1:
    raise InputError(f"max_order must be >= 1, got {max_order}.")
  if vocab_size**max_order > _KEY_LIMIT:
    fits = 1
    while vocab_size**(fits + 1) <= _KEY_LIMIT:
      fits += 1
    raise InputError(
        f"{max_order}-grams over a vocabulary of {vocab_size} do not fit one "
        f"uint64 key ({vocab_size}**{max_order} > 2**64); the largest order "
        f"this vocabulary allows is {fits}.")


def window_keys(ids_N: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
  """uint64 [N - order + 1]: key of the window starting at each position."""
  ids = ids_N.astype(KEY_DTYPE, copy=False)
  n = ids.shape[0] - order + 1
  if n <= 0:
    return np.zeros(0, KEY_DTYPE)
  keys = ids[:n].copy()
  v = KEY_DTYPE(vocab_size)
  for i in range(1, order):
    keys *= v
    keys += ids[i:i + n]
  return keys


def encode(ids_NxM: np.ndarray, vocab_size: int) -> np.ndarray:
  """uint64 [N]: keys of N n-grams given as rows of token ids."""
  ids = np.asarray(ids_NxM).astype(KEY_DTYPE)
  keys = ids[:, 0].copy()
  for i in range(1, ids.shape[1]):
    keys = keys * KEY_DTYPE(vocab_size) + ids[:, i]
  return keys


def decode(keys_N: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
  """int64 [N, order]: the token ids of each key (inverse of `encode`)."""
  keys = np.asarray(keys_N, KEY_DTYPE).copy()
  out = np.empty((keys.shape[0], order), np.int64)
  v = KEY_DTYPE(vocab_size)
  for i in range(order - 1, -1, -1):
    out[:, i] = keys % v
    keys //= v
  return out
