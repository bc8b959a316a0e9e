"""Hugging Face GPT-NeoX checkpoints <-> dynamo_jax parameters, tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.convert.sources import TOKENIZER_FILES, TensorSource, resolve
from dynamo_jax.errors import CheckpointError, ConfigError
from dynamo_jax.fileio import atomic_dir, write_safetensors
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params

# Non-parameter buffers that older GPT-NeoX checkpoints saved; recomputed here.
_IGNORED = re.compile(
    r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_SHARD_BYTES = 4 * 1024 ** 3


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and the parameter it becomes."""
  hf_name: str
  path: tuple[str, ...]  # path in our params pytree
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _t(x):
  return x.T


def layout(config: PythiaConfig) -> list[_Tensor]:
  """The complete HF <-> ours tensor map for `config`, in HF file order."""
  d, h, k = config.hidden_size, config.num_heads, config.head_dim
  f, v = config.intermediate_size, config.vocab_size
  out = [_Tensor("gpt_neox.embed_in.weight", ("embed_in", "embedding"), (v, d),
                 _same, _same)]
  for i in range(config.num_layers):
    pre, ours = f"gpt_neox.layers.{i}.", f"layers_{i}"
    for ln in ("input_layernorm", "post_attention_layernorm"):
      out += [_Tensor(pre + ln + ".weight", (ours, ln, "scale"), (d,), _same, _same),
              _Tensor(pre + ln + ".bias", (ours, ln, "bias"), (d,), _same, _same)]
    out += [
        # Fused QKV rows are ordered (head, q|k|v, head_dim).
        _Tensor(pre + "attention.query_key_value.weight",
                (ours, "attention", "qkv_kernel"), (3 * d, d),
                lambda w: w.reshape(h, 3, k, d).transpose(3, 0, 1, 2),
                lambda w: w.transpose(1, 2, 3, 0).reshape(3 * d, d)),
        _Tensor(pre + "attention.query_key_value.bias",
                (ours, "attention", "qkv_bias"), (3 * d,),
                lambda b: b.reshape(h, 3, k), lambda b: b.reshape(3 * d)),
        _Tensor(pre + "attention.dense.weight", (ours, "attention", "out_kernel"),
                (d, d), lambda w: w.T.reshape(h, k, d),
                lambda w: w.reshape(d, d).T),
        _Tensor(pre + "attention.dense.bias", (ours, "attention", "out_bias"),
                (d,), _same, _same),
        _Tensor(pre + "mlp.dense_h_to_4h.weight", (ours, "mlp", "in_kernel"),
                (f, d), _t, _t),
        _Tensor(pre + "mlp.dense_h_to_4h.bias", (ours, "mlp", "in_bias"), (f,),
                _same, _same),
        _Tensor(pre + "mlp.dense_4h_to_h.weight", (ours, "mlp", "out_kernel"),
                (d, f), _t, _t),
        _Tensor(pre + "mlp.dense_4h_to_h.bias", (ours, "mlp", "out_bias"), (d,),
                _same, _same),
    ]
  out += [
      _Tensor("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "scale"),
              (d,), _same, _same),
      _Tensor("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias"),
              (d,), _same, _same),
      _Tensor("embed_out.weight", ("embed_out",), (v, d), _t, _t),
  ]
  return out


def read_hf_config(directory: str) -> PythiaConfig:
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as fh:
      raw = json.load(fh)
  except FileNotFoundError:
    raise CheckpointError(f"{directory} has no config.json.") from None
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path} does not hold a JSON object.")
  return PythiaConfig.from_hf_config(raw)


def checked_tensors(config: PythiaConfig, source: TensorSource,
                    dtype: np.dtype, progress: bool, desc: str
                    ) -> tuple[list[_Tensor], Iterator[np.ndarray]]:
  """Checks names, then returns (specs in read order, lazy our-layout arrays).

  Each array's shape is checked as it is read.
  """
  specs = layout(config)
  expected = {s.hf_name for s in specs}
  present = set(source.keys())
  missing = sorted(expected - present)
  extra = sorted(n for n in present - expected if not _IGNORED.match(n))
  if missing:
    raise CheckpointError(
        f"checkpoint {source.directory} lacks {len(missing)} tensor(s) its "
        f"config implies, e.g. {missing[:4]}.")
  if extra:
    raise CheckpointError(
        f"checkpoint {source.directory} has {len(extra)} tensor(s) a GPT-NeoX "
        f"model with this config does not use, e.g. {extra[:4]}.")
  by_name = {s.hf_name: s for s in specs}
  ordered = [by_name[n] for n in source.read_order([s.hf_name for s in specs])]

  def arrays():
    for spec in tqdm(ordered, desc=desc, unit="tensor", disable=not progress):
      array = source.get(spec.hf_name)
      if tuple(array.shape) != spec.hf_shape:
        raise CheckpointError(
            f"tensor {spec.hf_name} has shape {tuple(array.shape)}, but "
            f"config.json implies {spec.hf_shape}.")
      yield np.ascontiguousarray(spec.to_ours(array).astype(dtype, copy=False))

  return ordered, arrays()


def from_hf(path_or_id: str, *, revision: str | None = None, dtype=None,
            progress: bool = False) -> tuple[PythiaConfig, Params]:
  """Loads an HF GPT-NeoX checkpoint (directory or hub id) as (config, params).

  `dtype` sets both the parameter and compute dtype ("float32" default,
  "bfloat16", "float16"). Tensors are converted and moved to the default
  device one at a time.
  """
  directory = resolve(path_or_id, revision)
  dtype = jnp.dtype(dtype or "float32").name
  config = read_hf_config(directory).replace(dtype=dtype, param_dtype=dtype)
  params: Params = {}
  specs, arrays = checked_tensors(config, TensorSource(directory),
                                  np.dtype(jnp.dtype(dtype)), progress, "loading")
  for array, spec in zip(arrays, specs):  # arrays first: ends its bar
    node = params
    for key in spec.path[:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = jax.device_put(array)
    del array
  return config, params


def _get(params: Params, path: tuple[str, ...]):
  for key in path:
    params = params[key]
  return params


def to_hf(config: PythiaConfig, params: Params, out_dir: str, *,
          progress: bool = False, tokenizer_dir: str | None = None) -> str:
  """Writes an HF directory that `GPTNeoXForCausalLM.from_pretrained` loads.

  Streams tensor by tensor into safetensors shards of at most 4 GiB, inside a
  temporary directory renamed onto `out_dir` only when complete.
  """
  specs = layout(config)
  for s in specs:
    want = s.to_ours(np.empty(s.hf_shape, np.int8)).shape
    try:
      got = tuple(_get(params, s.path).shape)
    except (KeyError, TypeError):
      raise CheckpointError(f"params lack {'/'.join(s.path)}.") from None
    if got != want:
      raise CheckpointError(f"params {'/'.join(s.path)} has shape {got}; "
                            f"config implies {want}.")
  tensors = ((s.hf_name, s.to_hf(np.asarray(_get(params, s.path))))
             for s in specs)
  with atomic_dir(out_dir) as tmp:
    _write_hf(config, specs, tensors,
              lambda s: np.dtype(_get(params, s.path).dtype), tmp, progress)
    copy_tokenizer(tokenizer_dir, tmp)
  return out_dir


def _write_hf(config, specs, tensors, dtype_of, tmp, progress):
  with open(os.path.join(tmp, "config.json"), "w") as fh:
    json.dump(config.to_hf_config(), fh, indent=2)
  shards, size = [[]], 0
  for s in specs:
    nbytes = int(np.prod(s.hf_shape)) * dtype_of(s).itemsize
    if shards[-1] and size + nbytes > _SHARD_BYTES:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += nbytes
  bar = tqdm(total=len(specs), desc="writing", unit="tensor",
             disable=not progress)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1 else
             f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    total += write_safetensors(
        os.path.join(tmp, fname),
        {s.hf_name: (s.hf_shape, dtype_of(s)) for s in shard},
        (next(tensors) for _ in shard), {"format": "pt"},
        progress=lambda _: bar.update())
    weight_map.update({s.hf_name: fname for s in shard})
  bar.close()
  if len(shards) > 1:
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                fh, indent=2)


def copy_tokenizer(src_dir: str | None, dst_dir: str) -> None:
  if src_dir is None:
    return
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src_dir, name)):
      shutil.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))
