"""Run metrics: DIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard summaries under DIR/tensorboard."""

from __future__ import annotations

import json
import math
import os

from dynamo_jax.fileio import atomic_write_text


class MetricsWriter:
  """Appends logged steps; on resume, drops entries past the restored step so
  the file reads as if the run had never been interrupted."""

  def __init__(self, workdir: str, *, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    _truncate_after(self.path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as fh:
      fh.write(json.dumps(record) + "\n")
      fh.flush()
      os.fsync(fh.fileno())
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as fh:
    for line in fh:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill mid-write
      if record.get("step", 0) <= step:
        kept.append(json.dumps(record) + "\n")
  atomic_write_text(path, "".join(kept))


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def last_record(workdir: str, step: int) -> dict:
  """The logged record of `step` ({"step": step} when it was not logged), for
  a run asked to go no further than it already has."""
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as fh:
      for line in fh:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if record.get("step") == step:
          return record
  return {"step": step}
