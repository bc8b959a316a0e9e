"""The training run: build model, data, optimiser and mesh; resume; step; log;
checkpoint. `python -m dynamo_jax train` calls `train`.

Nothing is written before the config and the data have been checked; the
checkpointer is closed (waiting for a save in flight) on every path. SIGINT
and SIGTERM stop the run at the next safe point with one line on stderr and
exit status 130 / 143 (`Interrupted`); re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.distributed import check_shared_dir
from dynamo_jax.errors import ConfigError, DynamoError
from dynamo_jax.fileio import atomic_write_text
from dynamo_jax.model.config import PythiaConfig, preset
from dynamo_jax.tokenizer import load_tokenizer
from dynamo_jax.training.checkpoint import Checkpointer, with_shardings
from dynamo_jax.training.config import TrainConfig, to_dict
from dynamo_jax.training.metrics import MetricsWriter, last_record
from dynamo_jax.training.optimizer import make_optimizer
from dynamo_jax.training.sharding import batch_sharding, make_mesh
from dynamo_jax.training.sources import (export_chat_model, exported_step,
                                         initial_params, make_data,
                                         tokenizer_path)
from dynamo_jax.training.step import (init_state, make_train_step,
                                      random_params_fn, state_shardings)

# Config keys a resumed run may change: they do not change what any step
# sees or computes. `steps` only lengthens the schedule (the cosine decay
# then ends later); mesh and grad_accum change how a step is split up, not
# its batch (tests/test_train_loop.py: sharded and accumulated steps agree).
# Every other key, including ones added later, must match the checkpoint.
RESUMABLE_KEYS = frozenset({
    "steps", "log_every", "ckpt_every", "keep_checkpoints",
    "async_checkpoints", "grad_accum", "mesh.data", "mesh.fsdp",
    "mesh.tensor", "data.prefetch"})


class TrainingError(DynamoError):
  """The run cannot continue (e.g. the loss became NaN)."""


class Interrupted(SystemExit):
  """SIGINT or SIGTERM stopped the run cleanly (no save in flight, the
  checkpointer closed). `code` is 128 + the signal (130, 143), so an uncaught
  one ends the process with that status and no traceback; `str()` is the
  line `train` printed on stderr."""

  def __init__(self, message: str, code: int):
    super().__init__(code)
    self.message = message

  def __str__(self) -> str:
    return self.message


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


def train(cfg: TrainConfig, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) training until cfg.steps; returns the last metrics.

  Raises:
    DynamoError: a bad config, data or checkpoint, before anything is written;
      TrainingError when the loss or learning rate stops being finite.
    Interrupted: SIGINT / SIGTERM (in the main thread), after a clean stop.
  """
  where = {"step": None, "checkpoint": None}
  with _StopOnSignals() as signals:
    try:
      return _train(cfg, workdir, progress, signals, where)
    except _Stop as stop:
      signum = stop.signum
  message = "interrupted " + (
      "before training started" if where["step"] is None
      else f"at step {where['step']}") + "; " + (
          f"the last checkpoint is step {where['checkpoint']}"
          if where["checkpoint"] is not None else
          "no checkpoint was saved yet, so a re-run starts from step 0"
      ) + "; re-run the same command to resume."
  print(message, file=sys.stderr, flush=True)
  raise Interrupted(message, 128 + signum)


def _train(cfg: TrainConfig, workdir: str, progress: bool,
           signals: "_StopOnSignals", where: dict) -> dict:
  # Cheap checks and the data first: a bad value or a missing file must fail
  # before the workdir or the checkpointer (and its threads) exist.
  cfg = cfg.validate()
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  config = model_config(cfg)
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.global_batch_size // cfg.grad_accum) % n_data:
    raise ConfigError(
        f"the per-microbatch batch {cfg.global_batch_size // cfg.grad_accum} "
        f"(global_batch_size / grad_accum) is not divisible by the data axes "
        f"data x fsdp = {n_data}.")
  tokenizer = load_tokenizer(tokenizer_path(cfg))
  opt = make_optimizer(cfg.optim, cfg.steps)
  abstract, shardings = state_shardings(config, opt, mesh)
  meta = {"model": dataclasses.asdict(config), "config": to_dict(cfg)}
  workdir = os.path.abspath(workdir)
  with contextlib.ExitStack() as cleanup:
    # Every process packs the whole global batch and puts on its devices
    # only the rows they hold (`_global_batch`). Packing is sequential, so
    # this is what makes the batches, and the data state saved with a
    # checkpoint, the same for any number of processes: a run resumes on
    # another host count, and every process resumes from the one state
    # process 0 saved. The cost is packing B x T tokens per step on each
    # host: for DynaMo-7.3B (64 x 2048 pre-tokenized ids) a 512 KiB read.
    data = make_data(cfg, tokenizer)
    cleanup.callback(data.close)
    # The run starts here.
    with signals.deferred():
      os.makedirs(workdir, exist_ok=True)
      check_shared_dir(workdir)
      ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                          every=cfg.ckpt_every, keep=cfg.keep_checkpoints,
                          async_save=cfg.async_checkpoints)
      cleanup.callback(_close, ckpt, signals, where)

    with signals.deferred():
      restored = ckpt.restore_latest(
          with_shardings(abstract, shardings), meta,
          check=lambda saved: _check_resumable(saved, meta, workdir))
    if restored is None:
      start = 0
      state = init_state(initial_params(cfg, config,
                                        random_params_fn(config, cfg.seed)),
                         opt, shardings)
    else:
      start, state, data_state = restored
      data.set_state(data_state)
    where["step"] = start
    where["checkpoint"] = None if restored is None else start
    if start > cfg.steps:
      raise ConfigError(
          f"steps={cfg.steps}, but the run in {workdir} is already at step "
          f"{start}; nothing was done. Give --steps above {start} to train "
          "further, or a new --workdir for a new run.")
    if jax.process_index() == 0:
      with signals.deferred():
        atomic_write_text(os.path.join(workdir, "config.json"),
                          json.dumps(meta, indent=2))
    if start == cfg.steps:
      print(f"the run in {workdir} is already at step {start} (steps="
            f"{cfg.steps}); nothing to do.", file=sys.stderr, flush=True)
      if exported_step(workdir) != start:  # a chat run killed mid-export
        with signals.deferred():
          export_chat_model(cfg, config, state["params"], tokenizer, workdir,
                            start)
      return last_record(workdir, start)

    writer = MetricsWriter(workdir, resume_step=start,
                           enabled=jax.process_index() == 0)
    cleanup.callback(writer.close)
    step_fn = make_train_step(config, opt, mesh, shardings,
                              grad_accum=cfg.grad_accum,
                              head_weights=cfg.optim.head_loss_weights)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    cleanup.callback(bar.close)
    log = _Logger(cfg, ckpt, writer, bar, start, signals)
    batch_sh = batch_sharding(mesh)
    # An async save is waited for at most this many steps after it was
    # dispatched. Left alone, it stays in flight until the next save starts
    # (ckpt_every steps later), and a kill meanwhile loses up to 2 x
    # ckpt_every steps: the kill lost 14 with ckpt_every 10. Bounded
    # at a tenth of the interval, a kill loses at most 1.1 x ckpt_every steps,
    # while a save still overlaps that many steps of compute. tiny-test on 2
    # busy CPU cores: one step, then 0.3-0.6 s of waiting per save, 3 s of a
    # 34 s run.
    max_in_flight = max(1, cfg.ckpt_every // 10)
    pending, last, saved_at = None, {}, None
    for step in range(start + 1, cfg.steps + 1):
      rows = next(data)
      data_state = data.get_state()
      batch = _global_batch(rows, batch_sh)
      state, metrics = step_fn(state, batch)
      where["step"] = step
      # Step N's metrics are fetched after step N+1 is dispatched; so is the
      # wait for a save, which then overlaps this step's compute.
      if pending is not None:
        last = log.finish(*pending)
      if saved_at is not None and step - saved_at >= max_in_flight:
        with signals.deferred():
          ckpt.wait()
        where["checkpoint"], saved_at = ckpt.latest_step(), None
      pending = (step, metrics)
      if ckpt.should_save(step) or step == cfg.steps:
        last = log.finish(*pending)  # never save a state whose loss is unchecked
        pending = None
        with signals.deferred():
          ckpt.save(step, state, data_state, meta, force=step == cfg.steps)
        saved_at = step
      bar.update()
    if pending is not None:
      last = log.finish(*pending)
    with signals.deferred():
      export_chat_model(cfg, config, state["params"], tokenizer, workdir,
                        cfg.steps)
  return last


class _Logger:
  """Fetches, checks and logs each step's metrics."""

  def __init__(self, cfg: TrainConfig, ckpt: Checkpointer,
               writer: MetricsWriter, bar, start: int,
               signals: "_StopOnSignals"):
    self.cfg, self.ckpt, self.writer, self.bar = cfg, ckpt, writer, bar
    self.signals = signals
    self.tokens_per_step = cfg.global_batch_size * cfg.seq_len
    self.window = (time.perf_counter(), start)

  def finish(self, step: int, metrics) -> dict:
    """Fetches step `step`'s metrics (blocking), checks them, logs them."""
    host = jax.tree.map(np.asarray, metrics)
    record = {"step": step, "loss": float(host["loss"]),
              "lr": float(host["lr"])}
    raw = ["loss", "lr"]
    for i, loss in enumerate(host["head_loss"], start=1):
      record[f"loss_head{i}"] = float(loss)
      record[f"ppl_head{i}"] = float(math.exp(min(float(loss), 50.0)))
      raw.append(f"loss_head{i}")
    record["grad_norm_head1"] = float(host["grad_norm_head1"])
    record["grad_norm_heads"] = float(host["grad_norm_heads"])
    raw += ["grad_norm_head1", "grad_norm_heads"]
    bad = [k for k in raw if not math.isfinite(record[k])]
    if bad:
      self._stop(step, record, bad)
    if step % self.cfg.log_every == 0 or step == self.cfg.steps:
      now = time.perf_counter()
      record["tokens_per_sec"] = ((step - self.window[1]) * self.tokens_per_step
                                  / max(now - self.window[0], 1e-9))
      self.window = (now, step)
      self.writer.write(record)
      self.bar.set_postfix(loss=f"{record['loss']:.3f}")
    return record

  def _stop(self, step: int, record: dict, bad: list[str]) -> None:
    with self.signals.deferred():
      self.ckpt.wait()
    good = self.ckpt.latest_step()
    values = ", ".join(f"{k}={record[k]}" for k in bad)
    kept = (f"the last good checkpoint (step {good}) is kept in "
            f"{self.ckpt.directory}" if good is not None else
            "no checkpoint had been saved yet")
    if "lr" in bad:
      fix = ("the learning-rate schedule gave a non-finite lr: check "
             "optim.lr_base, optim.warmup_frac and steps")
    else:
      fix = ("lower optim.lr_base or check the data, and train with a new "
             "--workdir")
    raise TrainingError(f"non-finite {values} at step {step}. Stopped; {kept}."
                        f" Fix: {fix}.")


def _global_batch(rows: dict, sharding) -> dict:
  """The global batch as sharded arrays; each process transfers only the
  rows its own devices hold."""
  return {k: jax.make_array_from_callback(v.shape, sharding,
                                          lambda index, v=v: v[index])
          for k, v in rows.items()}


def _close(ckpt: Checkpointer, signals: "_StopOnSignals", where: dict) -> None:
  """Waits for the save in flight and closes; a signal meanwhile waits too."""
  with signals.deferred():
    ckpt.wait()
    where["checkpoint"] = ckpt.latest_step()
    ckpt.close()


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _check_resumable(saved: dict, meta: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint trained with other settings."""
  old = saved.get("config")
  if not isinstance(old, dict):
    return  # written before configs were saved: only the model is checked
  old = _flat(old)
  new = _flat(json.loads(json.dumps(meta["config"])))
  # Keys on one side only come from another version of TrainConfig.
  changed = sorted(k for k in set(old) & set(new)
                   if old[k] != new[k] and k not in RESUMABLE_KEYS)
  if changed:
    listed = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
    raise ConfigError(
        f"the run in {workdir} was trained with other settings ({listed}); "
        "resuming would change what its steps see or compute. Use a new "
        "--workdir, or the settings in its config.json (only "
        f"{', '.join(sorted(RESUMABLE_KEYS))} may change).")


class _Stop(BaseException):
  """A SIGINT or SIGTERM, raised in the main thread (a BaseException, so no
  `except Exception` in a library swallows it)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class _StopOnSignals:
  """While entered (in the main thread), SIGINT and SIGTERM raise `_Stop`;
  inside `deferred()` the stop waits for the block's end. Every orbax call
  is deferred: some catch BaseException (`wait_until_finished` logs it as a
  failed save and carries on), and one stopped half-way leaves threads
  behind. A second signal exits at once: what orbax was writing is a
  temporary directory that the next run removes."""

  def __init__(self):
    self.signum = None
    self._depth = 0
    self._previous = {}

  def __enter__(self) -> "_StopOnSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self.signum is not None:
      print("interrupted again: exiting without waiting for the checkpoint "
            "being written; the one before it is kept.", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    if not self._depth:
      raise _Stop(signum)

  @contextlib.contextmanager
  def deferred(self):
    self._depth += 1
    try:
      yield
    finally:
      self._depth -= 1
    if self.signum is not None and not self._depth:
      raise _Stop(self.signum)
