"""dynamo_jax's own checkpoint format: a directory with

  dynamo_config.json   {"format": "dynamo_jax", "format_version": 1, "model": {...}}
  params.safetensors   every parameter, named by its pytree path ("layers_0/mlp/in_kernel")
  tokenizer files      when known (tokenizer.json, ...)

Written atomically and streamed tensor by tensor.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.convert.hf import checked_tensors, copy_tokenizer, read_hf_config
from dynamo_jax.convert.sources import TensorSource, resolve
from dynamo_jax.errors import CheckpointError
from dynamo_jax.fileio import SafetensorsReader, atomic_dir, write_safetensors
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, param_shapes

CONFIG_FILE = "dynamo_config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1


def _flat_shapes(config: PythiaConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  flat = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
  return {_key(path): (tuple(s.shape), np.dtype(s.dtype)) for path, s in flat}


def _key(path) -> str:
  return "/".join(p.key for p in path)


def _write_config(directory: str, config: PythiaConfig) -> None:
  with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
    json.dump({"format": "dynamo_jax", "format_version": FORMAT_VERSION,
               "model": config.to_dict()}, fh, indent=2)


def save(config: PythiaConfig, params: Params, out_dir: str, *,
         tokenizer_dir: str | None = None, progress: bool = False) -> str:
  """Saves (config, params) in the native format, atomically."""
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
  with atomic_dir(out_dir) as tmp:
    _write_config(tmp, config)
    bar = tqdm(total=len(specs), desc="saving", unit="tensor", disable=not progress)
    write_safetensors(os.path.join(tmp, PARAMS_FILE), specs,
                      ((n, np.asarray(flat[n])) for n in specs),
                      {"format": "dynamo_jax"}, progress=lambda _: bar.update())
    bar.close()
    copy_tokenizer(tokenizer_dir, tmp)
  return out_dir


def is_native(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, CONFIG_FILE))


def load(directory: str, *, dtype=None) -> tuple[PythiaConfig, Params]:
  """Loads a native checkpoint; `dtype` overrides param and compute dtype."""
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as fh:
      meta = json.load(fh)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  if meta.get("format") != "dynamo_jax" or meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{path} is not a dynamo_jax checkpoint of format version "
        f"{FORMAT_VERSION} (found {meta.get('format')!r} "
        f"v{meta.get('format_version')!r}).")
  config = PythiaConfig.from_dict(meta["model"])
  if dtype is not None:
    dtype = jnp.dtype(dtype).name
    config = config.replace(dtype=dtype, param_dtype=dtype)
  reader = SafetensorsReader(os.path.join(directory, PARAMS_FILE))
  specs = _flat_shapes(config)
  if set(reader.keys()) != set(specs):
    raise CheckpointError(
        f"{directory}: tensors do not match its config (missing "
        f"{sorted(set(specs) - set(reader.keys()))[:4]}, extra "
        f"{sorted(set(reader.keys()) - set(specs))[:4]}).")
  params: Params = {}
  for name, (shape, want_dtype) in specs.items():
    if reader.shape(name) != shape:
      raise CheckpointError(f"{directory}: {name} has shape "
                            f"{reader.shape(name)}; its config implies {shape}.")
    node = params
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.device_put(reader.get(name).astype(want_dtype))
  return config, params


def convert_hf_to_native(src: str, out_dir: str, *, revision: str | None = None,
                         dtype=None, progress: bool = True) -> str:
  """HF checkpoint (directory or hub id) -> native directory, streamed.

  Holds one tensor at a time in host memory; `dtype=None` keeps float32.
  """
  directory = resolve(src, revision)
  dtype = jnp.dtype(dtype or "float32").name
  config = read_hf_config(directory).replace(dtype=dtype, param_dtype=dtype)
  specs, arrays = checked_tensors(config, TensorSource(directory),
                                  np.dtype(jnp.dtype(dtype)), progress,
                                  "converting")
  names = ["/".join(s.path) for s in specs]
  shapes = _flat_shapes(config)
  with atomic_dir(out_dir) as tmp:
    _write_config(tmp, config)
    write_safetensors(os.path.join(tmp, PARAMS_FILE),
                      {n: shapes[n] for n in names},
                      ((n, a) for a, n in zip(arrays, names)),
                      {"format": "dynamo_jax"})
    copy_tokenizer(directory, tmp)
  return out_dir
