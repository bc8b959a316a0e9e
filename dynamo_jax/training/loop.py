"""The training run: build model, data, optimiser and mesh; resume; step; log;
checkpoint. `python -m dynamo_jax train` calls `train`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.convert.hf import from_hf
from dynamo_jax.data import make_batches
from dynamo_jax.errors import ConfigError, DynamoError
from dynamo_jax.model.config import PythiaConfig, preset
from dynamo_jax.model.heads import add_heads
from dynamo_jax.tokenizer import load_tokenizer
from dynamo_jax.training.checkpoint import Checkpointer, with_shardings
from dynamo_jax.training.config import TrainConfig, to_dict
from dynamo_jax.training.metrics import MetricsWriter
from dynamo_jax.training.optimizer import make_optimizer
from dynamo_jax.training.sharding import batch_sharding, make_mesh
from dynamo_jax.training.step import (init_state, make_train_step,
                                      random_params_fn, state_shardings)


class TrainingError(DynamoError):
  """The run cannot continue (e.g. the loss became NaN)."""


def model_config(cfg: TrainConfig) -> PythiaConfig:
  """The DynaMo model's config, before any weights are read."""
  spec = cfg.model
  extra = dict(num_token_heads=spec.num_token_heads, head_input=spec.head_input,
               dtype=spec.dtype, param_dtype=spec.param_dtype)
  if spec.base == "custom":
    try:
      return PythiaConfig(**{**spec.overrides, **extra})
    except TypeError as e:
      raise ConfigError(f"model.overrides: {e}") from None
  return preset(spec.base, **spec.overrides, **extra)


def _initial_params(cfg: TrainConfig, config: PythiaConfig):
  """A params source for init_state: a traced init fn, or loaded weights."""
  spec = cfg.model
  if spec.init == "random":
    return random_params_fn(config, cfg.seed)
  source = spec.checkpoint or f"EleutherAI/{spec.base}"
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


def train(cfg: TrainConfig, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) training until cfg.steps; returns the last metrics."""
  cfg = cfg.validate()
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  config = model_config(cfg)
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.global_batch_size // cfg.grad_accum) % n_data:
    raise ConfigError(
        f"the per-microbatch batch {cfg.global_batch_size // cfg.grad_accum} "
        f"(global_batch_size / grad_accum) is not divisible by the data axes "
        f"data x fsdp = {n_data}.")
  if cfg.global_batch_size % jax.process_count():
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not "
                      f"divisible by {jax.process_count()} processes.")
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.checkpoint
                             or f"EleutherAI/{cfg.model.base}")
  opt = make_optimizer(cfg.optim, cfg.steps)
  abstract, shardings = state_shardings(config, opt, mesh)
  meta = {"model": dataclasses.asdict(config), "config": to_dict(cfg)}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=cfg.ckpt_every,
                      keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  data = make_batches(cfg.data, tokenizer,
                      batch_size=cfg.global_batch_size // jax.process_count(),
                      seq_len=cfg.seq_len, seed=cfg.seed,
                      process_index=jax.process_index(),
                      process_count=jax.process_count())
  start = ckpt.latest_step()
  if start is None:
    start = 0
    state = init_state(_initial_params(cfg, config), opt, shardings)
  else:
    state, data_state = ckpt.restore(start, with_shardings(abstract, shardings),
                                     meta)
    data.set_state(data_state)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      json.dump(meta, fh, indent=2)
  writer = MetricsWriter(workdir, resume_step=start,
                         enabled=jax.process_index() == 0)
  step_fn = make_train_step(config, opt, mesh, shardings,
                            grad_accum=cfg.grad_accum,
                            head_weights=cfg.optim.head_loss_weights)
  batch_sh = batch_sharding(mesh)
  tokens_per_step = cfg.global_batch_size * cfg.seq_len
  bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
             disable=not progress or jax.process_index() != 0)
  pending, last, window = None, {}, [time.perf_counter(), start]

  def finish(step: int, metrics) -> dict:
    """Fetches step `step`'s metrics (blocking), checks them, logs them."""
    host = jax.tree.map(np.asarray, metrics)
    record = {"step": step, "loss": float(host["loss"]), "lr": float(host["lr"])}
    for i, loss in enumerate(host["head_loss"], start=1):
      record[f"loss_head{i}"] = float(loss)
      record[f"ppl_head{i}"] = float(math.exp(min(float(loss), 50.0)))
    record["grad_norm_head1"] = float(host["grad_norm_head1"])
    record["grad_norm_heads"] = float(host["grad_norm_heads"])
    if not all(math.isfinite(v) for v in record.values()):
      ckpt.wait()
      good = ckpt.latest_step()
      raise TrainingError(
          f"non-finite loss or gradient at step {step}: {record}. Stopped; "
          f"the last good checkpoint (step {good}) is kept in {ckpt.directory}."
          " Lower the learning rate or check the data.")
    if step % cfg.log_every == 0 or step == cfg.steps:
      now = time.perf_counter()
      record["tokens_per_sec"] = ((step - window[1]) * tokens_per_step
                                  / max(now - window[0], 1e-9))
      window[:] = [now, step]
      writer.write(record)
      bar.set_postfix(loss=f"{record['loss']:.3f}")
    return record

  try:
    for step in range(start + 1, cfg.steps + 1):
      local = next(data)
      data_state = data.get_state()
      batch = {k: jax.make_array_from_process_local_data(batch_sh, v)
               for k, v in local.items()}
      state, metrics = step_fn(state, batch)
      # Step N's metrics are fetched after step N+1 is dispatched.
      if pending is not None:
        last = finish(*pending)
      pending = (step, metrics)
      if ckpt.manager.should_save(step) or step == cfg.steps:
        last = finish(*pending)  # never save a state whose loss is unchecked
        pending = None
        ckpt.save(step, state, data_state, meta, force=step == cfg.steps)
      bar.update()
    if pending is not None:
      last = finish(*pending)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return last
