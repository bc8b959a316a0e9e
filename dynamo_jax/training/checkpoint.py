"""Orbax checkpoints of the train state, the data iterator's state and the run's
model config.

Orbax writes each step into a temporary directory and renames it when the
save has finished, so a run killed mid-save leaves the previous checkpoint as
the latest usable one; the unfinished directory is ignored (and cleaned up).
A finished step that no longer restores (a truncated file, a garbled
_METADATA) is set aside by `restore_latest`, never deleted, and the run
resumes from the newest step that does restore. Restoring takes the target
shardings, so a run may resume on another mesh.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynamo_jax.errors import CheckpointError


class UnreadableCheckpoint(CheckpointError):
  """A saved step whose files do not restore (corrupt, truncated)."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f"cannot restore step {step} from {directory}: {reason}")
    self.step, self.reason = step, reason


class Checkpointer:
  """Saves every `every` steps (async by default), keeps the last `keep`.

  Call `close` on every path once made: it waits for a save in flight.
  """

  def __init__(self, directory: str, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_names=("state", "data", "meta"))
    # Orbax removes the temporary directories of unfinished saves in a thread
    # that only its `save` joins. A run that stops before saving (bad data, a
    # Ctrl-C) would leave it running into interpreter shutdown, where it dies
    # with "cannot schedule new futures after shutdown". It is one directory
    # listing, so wait for it here.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory",
                            None)
    if await_cleanup is not None:
      await_cleanup()

  @property
  def set_aside_directory(self) -> str:
    """Where steps that do not restore are moved: outside `directory`, so the
    manager never lists them."""
    return self.directory + "_corrupt"

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is one the save interval keeps."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict, meta: dict, *,
           force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, abstract_state, meta: dict,
              check: Callable[[dict], None] | None = None):
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with
    .sharding); checks the checkpoint was written for the same model, then
    runs `check(saved_meta)` (which raises to refuse it) before reading the
    state. Returns (state, data_state).

    Raises:
      CheckpointError: another model's checkpoint.
      UnreadableCheckpoint: the step's files do not restore.
    """
    try:
      saved_meta = self.manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise UnreadableCheckpoint(self.directory, step, _reason(e)) from None
    if not isinstance(saved_meta, dict):
      raise UnreadableCheckpoint(self.directory, step,
                                 f"its meta is {type(saved_meta).__name__}, "
                                 "not a JSON object")
    if saved_meta.get("model") != meta.get("model"):
      raise CheckpointError(
          f"the checkpoint at {self.directory} (step {step}) was written for "
          f"another model: {_model_changes(saved_meta.get('model'), meta.get('model'))};"
          " use a new --workdir, or the config it was trained with.")
    if check is not None:
      check(saved_meta)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Also shape or dtype mismatches: `restore_latest` sets a step aside
      # only when an older one restores, so a cause common to all steps is
      # an error that moves nothing.
      raise UnreadableCheckpoint(self.directory, step, _reason(e)) from None
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, meta: dict,
                     check: Callable[[dict], None] | None = None):
    """Restores the newest step that restores; (step, state, data_state), or
    None when there is no checkpoint.

    Steps are tried newest first. Those that fail to restore are moved to
    `set_aside_directory` (by process 0, once an older step has restored),
    each with a one-line warning on stderr. Another model's checkpoint, or
    what `check` refuses, is an error, never a reason to try an older step.

    Raises:
      CheckpointError: no step restores (then nothing is moved), or a step was
        written for another model.
    """
    failed = []  # (step, reason), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state, meta, check)
        reason = None
      except UnreadableCheckpoint as e:
        _hush_abandoned_reads()
        state = data_state = None
        reason = e.reason
      if not _on_every_process(reason is None):
        failed.append((step, reason or "it failed to restore on another "
                       "process"))
        continue
      if failed:
        self._set_aside(failed, step)
      return step, state, data_state
    if failed:
      listed = "; ".join(f"step {s}: {r}" for s, r in failed)
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores ({listed}); nothing "
          "was moved. Move that directory aside to start from step 0, or use "
          "a new --workdir.")
    return None

  def _set_aside(self, failed: list[tuple[int, str]], resumed: int) -> None:
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_directory, exist_ok=True)
      for step, reason in failed:
        name, n = str(step), 1
        while os.path.exists(os.path.join(self.set_aside_directory, name)):
          n += 1
          name = f"{step}-{n}"
        dest = os.path.join(self.set_aside_directory, name)
        os.rename(os.path.join(self.directory, str(step)), dest)
        with open(dest + ".reason.txt", "w") as fh:
          fh.write(reason + "\n")
        print(f"warning: checkpoint step {step} does not restore ({reason}); "
              f"moved it to {dest} and resuming from step {resumed}.",
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("dynamo_jax:checkpoints_set_aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on all processes, so all resume from the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _reason(error: BaseException, limit: int = 240) -> str:
  """The root cause of a failed restore as one short line: follows explicit
  causes (TensorStore's "Encountered error while reading array index" wraps
  the useful "OUT_OF_RANGE: ..."), never implicit contexts."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split()) or "no message"
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _model_changes(saved: Any, current: Any) -> str:
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return f"saved {saved!r}, current {current!r}"
  keys = sorted(k for k in set(saved) | set(current)
                if saved.get(k) != current.get(k))
  return ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


_HUSHED = False


def _hush_abandoned_reads() -> None:
  """Silences what a failed restore leaves behind, for the rest of the process.

  Orbax stops at the first array that fails to read and closes its event
  loop; the reads still in flight then report, from TensorStore's threads and
  from garbage-collected coroutines, "Event loop is closed" and the same read
  error again: dozens of tracebacks, printed up to seconds later, after the
  one-line warning that already said which step failed and why. Only those
  are filtered (orbax's coroutines and tasks, asyncio's closed-loop error
  with no owner); everything else reaches the previous hooks.
  """
  global _HUSHED
  if _HUSHED:
    return
  _HUSHED = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_abandoned_task_filter)


def _is_abandoned_read(error: BaseException | None, owner: Any) -> bool:
  if (owner is None and isinstance(error, RuntimeError)
      and str(error) == "Event loop is closed"):
    return True
  return inspect.iscoroutine(owner) and _is_orbax(owner.cr_code.co_filename)


def _abandoned_task_filter(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not (message.startswith(("Task exception was never retrieved",
                                  "Task was destroyed but it is pending"))
              and _is_orbax(message))


_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))


def _is_orbax(text: str) -> bool:
  return _ORBAX_DIR in text
