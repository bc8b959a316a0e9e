"""Stages `base` and `heads`: the project's trainer on the prepared corpus,
run as `python -m dynamo_jax train` (so it resumes when re-run), and reading
a finished run back (model config, final params, metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orbax.checkpoint as ocp

from dynamo_jax.training.config import load_config
from dynamo_jax.training.loop import model_config

BASE_CONFIG = "default-base"
HEADS_CONFIG = "default-t3"
# Appended to every run's overrides; build.py --smoke shortens the runs.
EXTRA_OVERRIDES: list[str] = []


def data_overrides(work: str) -> list[str]:
  """Points a default-* config at WORK's tokens and tokenizer."""
  tokens = os.path.abspath(os.path.join(work, "tokens", "train.npy"))
  return [f"data.paths={json.dumps([tokens])}",
          f"tokenizer={os.path.abspath(os.path.join(work, 'tokenizer'))}",
          *EXTRA_OVERRIDES]


def heads_overrides(work: str) -> list[str]:
  return data_overrides(work) + [
      f"model.checkpoint={os.path.abspath(os.path.join(work, 'base_hf'))}"]


def train(config_name: str, workdir: str, overrides: list[str]) -> None:
  """Runs (or resumes) the trainer in a child process, output passed on."""
  cmd = [sys.executable, "-m", "dynamo_jax", "train", "--config", config_name,
         "--workdir", workdir, *overrides]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def final_params(config_name: str, workdir: str, overrides: list[str]):
  """(PythiaConfig, params) of the last checkpoint of a finished run."""
  cfg = load_config(config_name, overrides)
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                  item_names=("state", "data", "meta"))
  step = manager.latest_step()
  if step != cfg.steps:
    raise RuntimeError(f"{workdir} stops at step {step}, not the config's "
                       f"{cfg.steps}: run its stage again to finish it.")
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  return model_config(cfg), state["params"]


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh if line.strip()]
