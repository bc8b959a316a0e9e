"""Orbax checkpoints of the train state, the data iterator's state and the run's
model config.

Orbax writes each step into a temporary directory and renames it when the
save has finished, so a run killed mid-save leaves the previous checkpoint as
the latest usable one; the unfinished directory is ignored (and cleaned up).
Restoring takes the target shardings, so a run may resume on another mesh.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from dynamo_jax.errors import CheckpointError


class Checkpointer:
  """Saves every `every` steps (async by default), keeps the last `keep`."""

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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, *,
           force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, abstract_state, meta: dict):
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with
    .sharding); checks the checkpoint was written for the same model."""
    saved_meta = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if saved_meta.get("model") != meta.get("model"):
      raise CheckpointError(
          f"the checkpoint at {self.directory} (step {step}) was written for "
          f"another model:\n  saved:   {saved_meta.get('model')}\n  current: "
          f"{meta.get('model')}\nuse a new --workdir, or the config it was "
          "trained with.")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"cannot restore step {step} from "
                            f"{self.directory}: {e}") from None
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
