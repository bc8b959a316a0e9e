"""Where a run's weights and batches come from, and where a chat run's
fine-tuned model goes.

`model.checkpoint` (and `tokenizer`) may be "dynamo_jax:default", the
embedded default model shipped in the package; checkpoints in dynamo_jax's
own format load natively, others as HF GPT-NeoX directories or hub ids.

A run on instruction data (data.source "instructions") ends by exporting its
final params as a dynamo_jax checkpoint in WORKDIR/model: weights, the
tokenizer with the chat template it was trained with in
tokenizer_config.json (`chat.template.save_template`, so `dynamo_jax.load`,
`generate --model` and the chat tools format prompts exactly as in
training), and the initial checkpoint's co-occurrence table when it has one
(token statistics of its pre-training corpus; the vocabulary is unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from dynamo_jax.convert import native
from dynamo_jax.convert.hf import from_hf
from dynamo_jax.errors import ConfigError
from dynamo_jax.fileio import atomic_write_text
from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.heads import add_heads
from dynamo_jax.training.config import TrainConfig

DEFAULT_MODEL = "dynamo_jax:default"
EXPORT_DIR = "model"
EXPORT_INFO = "export.json"  # {"step": N}: which step WORKDIR/model holds
COOC_FILE = "cooc.npz"


def resolve_model_path(path: str | None) -> str | None:
  """DEFAULT_MODEL -> the embedded model's directory; others unchanged."""
  if path != DEFAULT_MODEL:
    return path
  from dynamo_jax.default_model import default_model_dir  # pylint: disable=import-outside-toplevel
  return default_model_dir()


def tokenizer_path(cfg: TrainConfig) -> str:
  return resolve_model_path(cfg.tokenizer or cfg.model.checkpoint
                            or f"EleutherAI/{cfg.model.base}")


def initial_params(cfg: TrainConfig, config: PythiaConfig, random_fn):
  """A params source for init_state: `random_fn` (model.init "random") or the
  loaded checkpoint with heads added up to model.num_token_heads."""
  spec = cfg.model
  if spec.init == "random":
    return random_fn
  source = resolve_model_path(spec.checkpoint) or f"EleutherAI/{spec.base}"
  if native.is_native(source):
    base_config, params = native.load(source, dtype=spec.param_dtype)
  else:
    base_config, params = from_hf(source, revision=spec.revision,
                                  dtype=spec.param_dtype, progress=True)
  base_config = base_config.replace(dtype=config.dtype)
  if base_config.replace(num_token_heads=config.num_token_heads,
                         head_input=config.head_input) != config:
    raise ConfigError(f"the checkpoint {source} has shapes {base_config}, not "
                      f"those of model.base {spec.base!r}.")
  _, params = add_heads(base_config, params, config.num_token_heads,
                        rng=cfg.seed, init=spec.head_init)
  return params


def make_data(cfg: TrainConfig, tokenizer):
  """The run's batch iterator (`data.make_batches`, or for instruction data
  `chat.instructions.make_batches`: batches with "loss_mask")."""
  # pylint: disable=import-outside-toplevel
  if cfg.data.source == "instructions":
    from dynamo_jax.chat.instructions import make_batches
  else:
    from dynamo_jax.data import make_batches
  return make_batches(cfg.data, tokenizer, batch_size=cfg.global_batch_size,
                      seq_len=cfg.seq_len, seed=cfg.seed)


def exported_step(workdir: str) -> int | None:
  try:
    with open(os.path.join(workdir, EXPORT_DIR, EXPORT_INFO),
              encoding="utf-8") as fh:
      return int(json.load(fh)["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def export_chat_model(cfg: TrainConfig, config: PythiaConfig, params,
                      tokenizer, workdir: str, step: int) -> str | None:
  """Writes WORKDIR/model for an instruction run (see the module docstring);
  None for other runs. Call on every process (the params are gathered);
  process 0 writes. An export of an earlier step is replaced."""
  if cfg.data.source != "instructions":
    return None
  from dynamo_jax.chat.instructions import resolve_template  # pylint: disable=import-outside-toplevel
  from dynamo_jax.chat.template import save_template  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(np.asarray, params)
  out = os.path.join(workdir, EXPORT_DIR)
  if jax.process_index() != 0:
    return out
  template, _ = resolve_template(tokenizer, cfg.data.chat_template)
  new = out + ".new"
  shutil.rmtree(new, ignore_errors=True)  # left by a killed export
  with tempfile.TemporaryDirectory(dir=workdir) as tok_dir:
    tokenizer.save_pretrained(tok_dir)
    # A template file of the tokenizer's own would take precedence over
    # tokenizer_config.json's: the one trained with is the only one kept.
    for name in ("chat_template.jinja", "chat_template.json"):
      if os.path.exists(os.path.join(tok_dir, name)):
        os.remove(os.path.join(tok_dir, name))
    native.save(config, params, new, tokenizer_dir=tok_dir)
  save_template(new, template)
  init_dir = resolve_model_path(cfg.model.checkpoint)
  if init_dir and os.path.isfile(os.path.join(init_dir, COOC_FILE)):
    shutil.copy(os.path.join(init_dir, COOC_FILE), os.path.join(new, COOC_FILE))
  atomic_write_text(os.path.join(new, EXPORT_INFO),
                    json.dumps({"step": step}) + "\n")
  if os.path.exists(out):
    shutil.rmtree(out)
  os.rename(new, out)
  return out
