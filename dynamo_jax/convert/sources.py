"""Where HF checkpoints come from: local directories and the Hugging Face Hub.

A checkpoint directory holds config.json and one of: model.safetensors,
model.safetensors.index.json with its shards, pytorch_model.bin, or
pytorch_model.bin.index.json with its shards. Safetensors is preferred; a
torch pickle is only ever loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import ml_dtypes
import numpy as np

from dynamo_jax.errors import CheckpointError
from dynamo_jax.fileio import SafetensorsReader

_HUB_PATTERNS_ST = ["config.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_PATTERNS_BIN = ["config.json", "pytorch_model*.bin",
                     "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")


def resolve(path_or_id: str, revision: str | None = None) -> str:
  """A local checkpoint directory: `path_or_id` itself, or a hub download."""
  path_or_id = os.fspath(path_or_id)
  if os.path.isdir(path_or_id):
    if revision is not None:
      raise CheckpointError(f"revision={revision!r} was given for the local "
                            f"directory {path_or_id}; revisions name hub "
                            "commits, so drop it or pass a hub id.")
    return path_or_id
  if os.path.exists(path_or_id) or path_or_id.count("/") != 1:
    raise CheckpointError(
        f"{path_or_id!r} is neither a checkpoint directory nor a hub id of the "
        "form 'owner/name' (e.g. 'EleutherAI/pythia-70m').")
  return _download(path_or_id, revision)


def _download(repo_id: str, revision: str | None) -> str:
  import huggingface_hub as hub  # pylint: disable=import-outside-toplevel
  try:
    files = hub.list_repo_files(repo_id, revision=revision)
    has_st = any(f.endswith(".safetensors") for f in files)
    patterns = _HUB_PATTERNS_ST if has_st else _HUB_PATTERNS_BIN
    return hub.snapshot_download(
        repo_id, revision=revision,
        allow_patterns=patterns + list(TOKENIZER_FILES))
  except Exception as e:  # network, auth, missing repo or revision
    raise CheckpointError(
        f"could not fetch {repo_id!r} (revision {revision or 'main'}) from the "
        f"Hugging Face Hub: {type(e).__name__}: {e}. Check the id and revision, "
        "your network, or pass a local checkpoint directory.") from None


class TensorSource:
  """Named tensors of one checkpoint, loaded one at a time as numpy arrays."""

  def __init__(self, directory: str):
    self.directory = directory
    self._where: dict[str, str] = {}  # tensor name -> file
    self._readers: dict[str, SafetensorsReader] = {}
    self._torch_file: str | None = None
    self._torch_state: dict | None = None
    d = lambda f: os.path.join(directory, f)  # noqa: E731
    if os.path.exists(d("model.safetensors.index.json")):
      self._index(d("model.safetensors.index.json"))
      self.kind = "safetensors"
    elif os.path.exists(d("model.safetensors")):
      r = self._reader(d("model.safetensors"))
      self._where = {k: r.path for k in r.keys()}
      self.kind = "safetensors"
    elif os.path.exists(d("pytorch_model.bin.index.json")):
      self._index(d("pytorch_model.bin.index.json"))
      self.kind = "torch"
    elif os.path.exists(d("pytorch_model.bin")):
      self._where = {k: d("pytorch_model.bin")
                     for k in self._torch_load(d("pytorch_model.bin"))}
      self.kind = "torch"
    else:
      raise CheckpointError(
          f"no weights in {directory}: expected model.safetensors, "
          "model.safetensors.index.json, pytorch_model.bin or "
          "pytorch_model.bin.index.json.")
    # transformers >= 5 names the output projection lm_head in memory (and so
    # in a torch.save of its state dict); files on the hub say embed_out.
    self._alias = {}
    if "lm_head.weight" in self._where and "embed_out.weight" not in self._where:
      self._alias["embed_out.weight"] = "lm_head.weight"
      self._where["embed_out.weight"] = self._where.pop("lm_head.weight")

  def _index(self, path):
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"unreadable shard index {path}: {e}") from None
    for name, shard in weight_map.items():
      self._where[name] = os.path.join(self.directory, shard)
      if not os.path.exists(self._where[name]):
        raise CheckpointError(f"shard {shard} named by {path} is missing.")

  def _reader(self, path) -> SafetensorsReader:
    if path not in self._readers:
      self._readers[path] = SafetensorsReader(path)
    return self._readers[path]

  def _torch_load(self, path) -> dict:
    if self._torch_file != path:
      self._torch_state = None  # drop the previous shard first
      self._torch_state = _load_bin(path)
      self._torch_file = path
    return self._torch_state

  def keys(self) -> list[str]:
    return list(self._where)

  def get(self, name: str) -> np.ndarray:
    path = self._where[name]
    name = self._alias.get(name, name)
    if path.endswith(".safetensors"):
      reader = self._reader(path)
      if name not in reader.keys():
        raise CheckpointError(f"{path} lacks tensor {name} that its index names.")
      return reader.get(name)
    state = self._torch_load(path)
    if name not in state:
      raise CheckpointError(f"{path} lacks tensor {name} that its index names.")
    return _torch_to_numpy(state[name])

  def read_order(self, names: list[str]) -> list[str]:
    """`names` grouped by file (stable), so each torch shard loads once."""
    return sorted(names, key=lambda n: self._where[n])


def _load_bin(path: str) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"{path} is not a plain weights file: torch.load(weights_only=True) "
        f"refused it ({str(e).splitlines()[0]}). dynamo_jax never unpickles "
        "arbitrary objects; convert it to safetensors with trusted tooling.") from None
  except Exception as e:  # zip/EOF errors of a damaged file
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
    raise CheckpointError(f"{path} does not hold a flat state dict of tensors.")
  return state


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()
