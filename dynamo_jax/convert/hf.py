"""Hugging Face GPT-NeoX checkpoints <-> dynamo_jax parameters, tensor by tensor.

A DynaMo model (num_token_heads N > 1) is exported as the GPT-NeoX checkpoint
of head 1, which transformers loads as it is, plus one file beside it:

  dynamo_heads.safetensors  heads 2..N, each a GPT-NeoX decoder layer in HF
                            layout, named "heads.{i}.<GPTNeoXLayer parameter>"
                            (e.g. heads.2.attention.query_key_value.weight),
                            so a torch GPTNeoXLayer loads a head's tensors as
                            they are. Its safetensors __metadata__ is
                            {"format": "dynamo_jax_heads", "format_version":
                            "1", "num_token_heads": "N", "head_input": "stem"
                            or "last"} (PythiaConfig's fields of those names).

transformers ignores the file; `from_hf` (so also `dynamo_jax.load` and
`python -m dynamo_jax convert`) reads it back when present, bit for bit.
Every tensor read is checked to be floating point and finite.
"""

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

from dynamo_jax.convert.sources import (HEADS_FILE, TOKENIZER_FILES,
                                        TensorSource, resolve)
from dynamo_jax.errors import CheckpointError, ConfigError
from dynamo_jax.fileio import (SafetensorsReader, atomic_output, check_tensor,
                               checked_cast, write_safetensors)
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params

# Non-parameter buffers that older GPT-NeoX checkpoints saved; recomputed here.
_IGNORED = re.compile(
    r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_SHARD_BYTES = 4 * 1024 ** 3
_HEADS_META = {"format": "dynamo_jax_heads", "format_version": "1"}
_DAMAGED = "re-download the checkpoint or re-export it from a healthy model."
_UNSAVABLE = ("refusing to write a checkpoint that cannot be loaded; save "
              "finite floating-point params (e.g. from before a divergence).")


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


def _decoder_layer(config: PythiaConfig, pre: str, ours: str) -> list[_Tensor]:
  """One GPT-NeoX decoder layer: HF names `pre` + ..., our subtree `ours`."""
  d, h, k = config.hidden_size, config.num_heads, config.head_dim
  f = config.intermediate_size
  out = []
  for ln in ("input_layernorm", "post_attention_layernorm"):
    out += [_Tensor(pre + ln + ".weight", (ours, ln, "scale"), (d,), _same, _same),
            _Tensor(pre + ln + ".bias", (ours, ln, "bias"), (d,), _same, _same)]
  return out + [
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


def layout(config: PythiaConfig) -> list[_Tensor]:
  """The complete HF <-> ours tensor map for `config`, in HF file order:
  the GPT-NeoX checkpoint, then the DynaMo heads 2..N of HEADS_FILE."""
  d, v = config.hidden_size, config.vocab_size
  out = [_Tensor("gpt_neox.embed_in.weight", ("embed_in", "embedding"), (v, d),
                 _same, _same)]
  for i in range(config.num_layers):
    out += _decoder_layer(config, f"gpt_neox.layers.{i}.", f"layers_{i}")
  out += [
      _Tensor("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "scale"),
              (d,), _same, _same),
      _Tensor("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias"),
              (d,), _same, _same),
      _Tensor("embed_out.weight", ("embed_out",), (v, d), _t, _t),
  ]
  for i in range(2, config.num_token_heads + 1):
    out += _decoder_layer(config, f"heads.{i}.", f"heads_{i}")
  return out


def _is_head(spec: _Tensor) -> bool:
  return spec.hf_name.startswith("heads.")


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
  config = PythiaConfig.from_hf_config(raw)
  heads = os.path.join(directory, HEADS_FILE)
  if os.path.exists(heads):
    config = _with_heads(config, SafetensorsReader(heads))
  return config


def _with_heads(config: PythiaConfig, reader: SafetensorsReader) -> PythiaConfig:
  """`config` with the token heads that HEADS_FILE's metadata records."""
  meta = dict(reader.metadata)
  if {k: meta.pop(k, None) for k in _HEADS_META} != _HEADS_META:
    raise CheckpointError(
        f"{reader.path} is not a dynamo_jax heads file: its metadata lacks "
        f"{_HEADS_META}; remove it or re-export the model with to_hf.")
  try:
    heads = {"num_token_heads": int(meta.pop("num_token_heads")),
             "head_input": meta.pop("head_input")}
  except (KeyError, ValueError):
    raise CheckpointError(
        f"{reader.path}: its metadata needs num_token_heads (an integer) and "
        "head_input; re-export the model with to_hf.") from None
  if meta:
    raise CheckpointError(f"{reader.path}: metadata keys {sorted(meta)} are "
                          "not understood; remove them.")
  if heads["num_token_heads"] < 2:
    raise CheckpointError(f"{reader.path} records num_token_heads="
                          f"{heads['num_token_heads']}; a heads file holds "
                          "heads 2..N, so N >= 2.")
  try:
    return config.replace(**heads)
  except ConfigError as e:
    raise ConfigError(f"{reader.path}: {e}") from None


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
      what = f"tensor {spec.hf_name} in {source.file_of(spec.hf_name)}"
      yield np.ascontiguousarray(
          checked_cast(spec.to_ours(array), dtype, what, _DAMAGED))

  return ordered, arrays()


def from_hf(path_or_id: str, *, revision: str | None = None, dtype=None,
            progress: bool = False) -> tuple[PythiaConfig, Params]:
  """Loads an HF GPT-NeoX checkpoint (directory or hub id) as (config, params).

  `dtype` sets both the parameter and compute dtype ("float32" default,
  "bfloat16", "float16"). Tensors are converted and moved to the default
  device one at a time. A DynaMo export's heads 2..N (HEADS_FILE) are read
  too. Raises CheckpointError on a tensor that is not floating point or not
  finite, naming it and its file.
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


def require_standard_layout(config: PythiaConfig) -> None:
  """CheckpointError for params in a decode-time layout (weight_layout
  "panels", from kernels/cpu_matmul.pack_params): they are never saved."""
  if config.weight_layout != "standard":
    raise CheckpointError(
        f"these parameters are in the {config.weight_layout!r} layout (a "
        "decode-time copy from cpu_matmul.pack_params); save the model "
        "loaded before packing.")


def to_hf(config: PythiaConfig, params: Params, out_dir: str, *,
          progress: bool = False, tokenizer_dir: str | None = None) -> str:
  """Writes an HF directory that `GPTNeoXForCausalLM.from_pretrained` loads.

  Streams tensor by tensor into safetensors shards of at most 4 GiB, inside a
  temporary directory renamed onto `out_dir` only when complete. A DynaMo
  model's heads 2..N go to HEADS_FILE beside them (see the module docstring).
  """
  require_standard_layout(config)
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

  def tensors():
    for s in specs:
      array = np.asarray(_get(params, s.path))
      check_tensor(array, f"param {'/'.join(s.path)}", _UNSAVABLE)
      yield s.hf_name, s.to_hf(array)

  with atomic_output(out_dir) as tmp:
    _write_hf(config, specs, tensors(),
              lambda s: np.dtype(_get(params, s.path).dtype), tmp, progress)
    copy_tokenizer(tokenizer_dir, tmp)
  return out_dir


def _write_hf(config, specs, tensors, dtype_of, tmp, progress):
  with open(os.path.join(tmp, "config.json"), "w") as fh:
    json.dump(config.to_hf_config(), fh, indent=2)
  heads = [s for s in specs if _is_head(s)]
  shards, size = [[]], 0
  for s in specs:
    if _is_head(s):
      continue
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
  if heads:  # layout() puts them last
    write_safetensors(
        os.path.join(tmp, HEADS_FILE),
        {s.hf_name: (s.hf_shape, dtype_of(s)) for s in heads},
        (next(tensors) for _ in heads),
        {**_HEADS_META, "num_token_heads": str(config.num_token_heads),
         "head_input": config.head_input},
        progress=lambda _: bar.update())
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
