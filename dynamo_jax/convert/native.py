"""dynamo_jax's own checkpoint format: a directory with

  dynamo_config.json   {"format": "dynamo_jax", "format_version": 1, "model": {...}}
  params.safetensors   every parameter, named by its pytree path ("layers_0/mlp/in_kernel")
  checksums.json       {"algorithm": "sha256", "file": "params.safetensors",
                        "tensors": {name: sha256 of that tensor's stored bytes}}
  tokenizer files      when known (tokenizer.json, ...)

Written atomically and streamed tensor by tensor. Loading checks every tensor
against checksums.json and refuses, naming the tensor, one whose bytes
changed; checkpoints written before checksums existed (no checksums.json)
still load. Every tensor must be floating point and finite either way.

The checksums are per tensor, not of the whole file, so that an error names
the damaged tensor and each tensor is verified as it is read (no second pass
over the file); they live beside the params because the safetensors header
is written before the streamed tensors are known.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.convert.hf import (checked_tensors, copy_tokenizer,
                                   read_hf_config, require_standard_layout)
from dynamo_jax.convert.sources import TensorSource, resolve
from dynamo_jax.errors import CheckpointError
from dynamo_jax.fileio import (SafetensorsReader, atomic_output,
                               atomic_write_text, check_tensor, checked_cast,
                               tensor_sha256, write_safetensors)
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, param_shapes

CONFIG_FILE = "dynamo_config.json"
PARAMS_FILE = "params.safetensors"
CHECKSUMS_FILE = "checksums.json"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("format", "format_version", "model")
_DAMAGED = "the checkpoint is damaged: re-download or re-convert it."


def _flat_shapes(config: PythiaConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  flat = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
  return {_key(path): (tuple(s.shape), np.dtype(s.dtype)) for path, s in flat}


def _key(path) -> str:
  return "/".join(p.key for p in path)


def _write(directory: str, config: PythiaConfig, specs, tensors,
           progress=None) -> None:
  """Writes the config, the params (streamed from `tensors`) and checksums."""
  require_standard_layout(config)
  with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
    json.dump({"format": "dynamo_jax", "format_version": FORMAT_VERSION,
               "model": config.to_dict()}, fh, indent=2)
  digests = {}

  def hashed():
    for name, array in tensors:
      array = np.ascontiguousarray(array)
      digests[name] = tensor_sha256(array)
      yield name, array

  write_safetensors(os.path.join(directory, PARAMS_FILE), specs, hashed(),
                    {"format": "dynamo_jax"}, progress=progress)
  _write_checksums(directory, digests)


def _write_checksums(directory: str, digests: dict[str, str]) -> None:
  atomic_write_text(os.path.join(directory, CHECKSUMS_FILE), json.dumps(
      {"algorithm": "sha256", "file": PARAMS_FILE, "tensors": digests},
      indent=1))


def save(config: PythiaConfig, params: Params, out_dir: str, *,
         tokenizer_dir: str | None = None, progress: bool = False) -> str:
  """Saves (config, params) in the native format, atomically.

  Refuses params that are not floating point or not finite (CheckpointError
  naming the first such param): they would not load.
  """
  require_standard_layout(config)
  specs = _flat_shapes(config)
  flat = {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(flat) != set(specs):
    raise CheckpointError(
        f"params do not match the config: missing {sorted(set(specs) - set(flat))[:4]}, "
        f"extra {sorted(set(flat) - set(specs))[:4]}.")
  for name, (shape, _) in specs.items():
    if tuple(flat[name].shape) != shape:
      raise CheckpointError(f"param {name} has shape {tuple(flat[name].shape)}; "
                            f"config implies {shape}.")
  specs = {n: (s, np.dtype(flat[n].dtype)) for n, (s, _) in specs.items()}

  def tensors():
    for name in specs:
      array = np.asarray(flat[name])
      check_tensor(array, f"param {name}",
                   "refusing to save params that cannot be loaded.")
      yield name, array

  with atomic_output(out_dir) as tmp:
    bar = tqdm(total=len(specs), desc="saving", unit="tensor", disable=not progress)
    _write(tmp, config, specs, tensors(), progress=lambda _: bar.update())
    bar.close()
    copy_tokenizer(tokenizer_dir, tmp)
  return out_dir


def is_native(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, CONFIG_FILE))


def _read_config(directory: str) -> PythiaConfig:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as fh:
      meta = json.load(fh)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path} does not hold a JSON object.")
  if meta.get("format") != "dynamo_jax" or meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{path} is not a dynamo_jax checkpoint of format version "
        f"{FORMAT_VERSION} (found {meta.get('format')!r} "
        f"v{meta.get('format_version')!r}).")
  unknown = sorted(set(meta) - set(_CONFIG_KEYS))
  if unknown:
    raise CheckpointError(f"{path} has unknown top-level keys {unknown}; it "
                          f"holds only {list(_CONFIG_KEYS)}: remove them.")
  if not isinstance(meta.get("model"), dict):
    raise CheckpointError(f"{path} lacks its \"model\" object (the model's "
                          "config); re-convert the checkpoint.")
  if meta["model"].get("weight_layout", "standard") != "standard":
    raise CheckpointError(
        f"{path} says weight_layout {meta['model']['weight_layout']!r}; "
        "saved weights are always in the standard layout: remove the field.")
  return PythiaConfig.from_dict(meta["model"])


def _read_checksums(directory: str, reader: SafetensorsReader) -> dict | None:
  """Tensor name -> sha256 from checksums.json; None when there is none."""
  path = os.path.join(directory, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      meta = json.load(fh)
    if (meta["algorithm"], meta["file"]) != ("sha256", PARAMS_FILE):
      raise ValueError(f"it covers {meta['file']!r} with {meta['algorithm']!r}"
                       f", not {PARAMS_FILE!r} with 'sha256'")
    digests = dict(meta["tensors"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"cannot read the checksums {path}: {e}; "
                          f"{_DAMAGED}") from None
  if set(digests) != set(reader.keys()):
    diff = sorted(set(digests) ^ set(reader.keys()))
    raise CheckpointError(f"{path} and {reader.path} disagree on which "
                          f"tensors exist, e.g. {diff[:4]}; {_DAMAGED}")
  return digests


def load(directory: str, *, dtype=None) -> tuple[PythiaConfig, Params]:
  """Loads a native checkpoint; `dtype` overrides param and compute dtype.

  Raises CheckpointError naming the tensor and file when a tensor does not
  match its checksum, is not floating point, or is not finite.
  """
  config = _read_config(directory)
  if dtype is not None:
    dtype = jnp.dtype(dtype).name
    config = config.replace(dtype=dtype, param_dtype=dtype)
  params_path = os.path.join(directory, PARAMS_FILE)
  if not os.path.exists(params_path):
    raise CheckpointError(
        f"{directory} has {CONFIG_FILE} but no {PARAMS_FILE}: the checkpoint "
        "is incomplete (an interrupted copy?); copy or re-convert it whole.")
  reader = SafetensorsReader(params_path)
  specs = _flat_shapes(config)
  if set(reader.keys()) != set(specs):
    raise CheckpointError(
        f"{directory}: tensors do not match its config (missing "
        f"{sorted(set(specs) - set(reader.keys()))[:4]}, extra "
        f"{sorted(set(reader.keys()) - set(specs))[:4]}).")
  digests = _read_checksums(directory, reader)
  params: Params = {}
  for name, (shape, want_dtype) in specs.items():
    if reader.shape(name) != shape:
      raise CheckpointError(f"{directory}: {name} has shape "
                            f"{reader.shape(name)}; its config implies {shape}.")
    array = reader.get(name)
    what = f"tensor {name} in {params_path}"
    if digests is not None and tensor_sha256(array) != digests[name]:
      raise CheckpointError(f"{what} does not match its sha256 in "
                            f"{CHECKSUMS_FILE}; {_DAMAGED}")
    cast = checked_cast(array, want_dtype, what, _DAMAGED)
    node = params
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.device_put(cast)
  return config, params


def add_checksums(directory: str) -> str:
  """Writes checksums.json for a checkpoint saved before checksums existed.

  Every tensor is checked (floating point, finite) first; params.safetensors
  is not rewritten. Refuses a checkpoint that already has checksums.
  """
  if os.path.exists(os.path.join(directory, CHECKSUMS_FILE)):
    raise CheckpointError(f"{directory} already has {CHECKSUMS_FILE}.")
  load(directory)  # the config, shapes and values are sound
  reader = SafetensorsReader(os.path.join(directory, PARAMS_FILE))
  try:
    _write_checksums(directory, {n: tensor_sha256(reader.get(n))
                                 for n in reader.keys()})
  except OSError as e:
    raise CheckpointError(f"cannot write {directory}: {e}") from None
  return os.path.join(directory, CHECKSUMS_FILE)


def convert_hf_to_native(src: str, out_dir: str, *, revision: str | None = None,
                         dtype=None, progress: bool = True) -> str:
  """HF checkpoint (directory or hub id) -> native directory, streamed.

  Holds one tensor at a time in host memory; `dtype=None` keeps float32. A
  DynaMo export's heads (convert/hf.py) come along.
  """
  directory = resolve(src, revision)
  dtype = jnp.dtype(dtype or "float32").name
  config = read_hf_config(directory).replace(dtype=dtype, param_dtype=dtype)
  specs, arrays = checked_tensors(config, TensorSource(directory),
                                  np.dtype(jnp.dtype(dtype)), progress,
                                  "converting")
  names = ["/".join(s.path) for s in specs]
  shapes = _flat_shapes(config)
  with atomic_output(out_dir) as tmp:
    _write(tmp, config, {n: shapes[n] for n in names},
           ((n, a) for a, n in zip(arrays, names)))  # arrays first: ends its bar
    copy_tokenizer(directory, tmp)
  return out_dir
