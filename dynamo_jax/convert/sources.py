"""Where HF checkpoints come from: local directories and the Hugging Face Hub.

A checkpoint directory holds config.json and one of: model.safetensors,
model.safetensors.index.json with its shards, pytorch_model.bin, or
pytorch_model.bin.index.json with its shards; a DynaMo model exported by
`to_hf` also holds its token heads 2..N in dynamo_heads.safetensors (see
convert/hf.py). Safetensors is preferred; a torch pickle is only ever loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import ml_dtypes
import numpy as np

from dynamo_jax.errors import CheckpointError
from dynamo_jax.fileio import SafetensorsReader

HEADS_FILE = "dynamo_heads.safetensors"
_HUB_PATTERNS_ST = ["config.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_PATTERNS_BIN = ["config.json", "pytorch_model*.bin",
                     "pytorch_model.bin.index.json", HEADS_FILE]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
# Seconds before a hub request is given up: a missing network then fails in
# about a second instead of the ~25 s of huggingface_hub's retries.
_HUB_TIMEOUT = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def resolve(path_or_id: str, revision: str | None = None) -> str:
  """A local checkpoint directory: `path_or_id` itself, or a hub download."""
  path_or_id = os.fspath(path_or_id)
  if os.path.isdir(path_or_id):
    if revision is not None:
      raise CheckpointError(f"revision={revision!r} was given for the local "
                            f"directory {path_or_id}; revisions name hub "
                            "commits, so drop it or pass a hub id.")
    return path_or_id
  if os.path.exists(path_or_id):
    raise CheckpointError(f"{path_or_id} is a file, not a checkpoint "
                          "directory; pass the directory that holds it.")
  if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
    raise CheckpointError(
        f"{path_or_id!r} is neither a checkpoint directory (no local directory "
        "of that name exists) nor a hub id of the form 'owner/name' (e.g. "
        "'EleutherAI/pythia-70m').")
  return _download(path_or_id, revision)


def _first_line(e: BaseException) -> str:
  text = _ANSI.sub("", str(e)).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _download(repo_id: str, revision: str | None) -> str:
  # pylint: disable=import-outside-toplevel
  import huggingface_hub as hub
  from huggingface_hub.utils import HfHubHTTPError

  def fail(e: BaseException, how: str = ""):
    return CheckpointError(
        f"no local directory {repo_id!r} exists, and fetching it as a Hugging "
        f"Face Hub id (revision {revision or 'main'}) failed{how}: "
        f"{type(e).__name__}: {_first_line(e).rstrip('.')}. Check the path, "
        "or the hub id, revision and your network.")

  try:
    # One request with a timeout (list_repo_files retries for ~25 s).
    info = hub.model_info(repo_id, revision=revision, timeout=_HUB_TIMEOUT)
    files = [s.rfilename for s in info.siblings or ()]
  except HfHubHTTPError as e:  # the hub answered: no such repo, revision, access
    raise fail(e) from None
  except Exception as e:  # pylint: disable=broad-except
    # Offline or unreachable: use a copy downloaded before, if cached.
    try:
      return hub.snapshot_download(
          repo_id, revision=revision, local_files_only=True,
          allow_patterns=(_HUB_PATTERNS_ST + _HUB_PATTERNS_BIN
                          + list(TOKENIZER_FILES)))
    except Exception:  # pylint: disable=broad-except
      raise fail(e, " (the hub is unreachable and no copy is cached)") from None
  has_st = any(f.endswith(".safetensors") and f != HEADS_FILE for f in files)
  try:
    return hub.snapshot_download(
        repo_id, revision=revision, etag_timeout=_HUB_TIMEOUT,
        allow_patterns=((_HUB_PATTERNS_ST if has_st else _HUB_PATTERNS_BIN)
                        + list(TOKENIZER_FILES)))
  except Exception as e:  # network, disk
    raise fail(e) from None


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
    if os.path.exists(d(HEADS_FILE)):
      r = self._reader(d(HEADS_FILE))
      clash = sorted(set(r.keys()) & set(self._where))
      if clash:
        raise CheckpointError(f"{r.path} repeats tensors of the GPT-NeoX "
                              f"checkpoint beside it, e.g. {clash[:4]}.")
      self._where.update({k: r.path for k in r.keys()})

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

  def file_of(self, name: str) -> str:
    return self._where[name]

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
  except pickle.UnpicklingError:
    raise CheckpointError(
        f"{path} is not a plain weights file: it holds non-tensor Python "
        "objects, which dynamo_jax refuses to unpickle for safety; re-save "
        "its state dict as safetensors with tooling you trust.") from None
  except FileNotFoundError:
    raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: "
                          "re-download or re-save it.") from None
  except Exception as e:  # zip/EOF/mmap errors of a damaged file
    raise CheckpointError(
        f"{path} is truncated or corrupt: torch cannot read it "
        f"({type(e).__name__}: {_first_line(e)[:120]}); re-download or "
        "re-save it.") from None
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
    raise CheckpointError(f"{path} does not hold a flat state dict of tensors.")
  return state


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()
