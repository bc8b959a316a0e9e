"""Resumable generation runs, shared by `eval completions` and `eval chat`:
an output directory holding run.json (what its rows depend on; other
settings are refused), a lock (one writer at a time), rows appended one JSON
line at a time with flush + fsync (a partial last line left by a kill is cut
on the next start), and `generate` calls timed by the wall clock with the
compile outside the timed call.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from dynamo_jax.errors import InputError, show_value

SETTINGS_FILE = "run.json"
# generate's keyword defaults that shape a row; recorded, never passed.
_LIBRARY_DEFAULTS = ("k", "alpha", "repetition_penalty", "use_cooc", "blur",
                     "otsu", "exact_head1", "kernel")


def parse_eps_b_grid(text: str) -> list[float]:
  """'0,0.5,1' -> [0.0, 0.5, 1.0], each checked to lie in [0, 1]."""
  return check_grid(text.split(","))


def check_grid(values) -> list[float]:
  """eps_b values as sorted unique floats, each checked to lie in [0, 1]."""
  numbers = []
  for value in values:
    try:
      numbers.append(float(value))
    except (TypeError, ValueError):
      raise InputError(f"eps_b {show_value(value)} is not a number; give "
                       "values in [0, 1], e.g. 0,0.5,1.") from None
  bad = [v for v in numbers if not 0.0 <= v <= 1.0]
  if bad or not numbers:
    raise InputError(f"eps_b values must lie in [0, 1] (1 is AR), got "
                     f"{bad[0] if bad else 'none'}.")
  return sorted(set(numbers))


def check_seeds(seeds) -> list[int]:
  """A count S -> [0, ..., S-1]; a list of non-negative ints -> sorted, unique."""
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    if seeds >= 1:
      return list(range(seeds))
    raise InputError(f"seeds must be >= 1 (seeds per prompt), got {seeds}.")
  seeds = list(seeds)  # generate checks the upper bound
  if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
    raise InputError("seeds must be a count or non-negative integers.")
  return sorted(set(seeds))



def generation_settings(model, model_name, max_new_tokens, temperature,
                        batch_seeds) -> dict:
  """What a generated row depends on besides its prompt: the model, the
  sampling settings and generate's keyword defaults (JSON-able)."""
  # pylint: disable=import-outside-toplevel
  import inspect
  from dynamo_jax.decoding.generate import generate
  params = inspect.signature(generate).parameters
  settings = {
      "model": model_name, "model_config": dataclasses.asdict(model.config),
      "max_new_tokens": max_new_tokens, "temperature": temperature,
      "batch_seeds": batch_seeds, "cooc_table": model.cooc is not None,
      "generate_defaults": {k: params[k].default for k in _LIBRARY_DEFAULTS}}
  return json.loads(json.dumps(settings, default=str))



def check_settings(out_dir: str, settings: dict,
                   tool: str = "completions") -> None:
  """Writes run.json in a new directory, or refuses other settings (`tool`
  names the command that makes such directories)."""
  from dynamo_jax import fileio  # pylint: disable=import-outside-toplevel
  path = os.path.join(out_dir, SETTINGS_FILE)
  fileio.remove_stale(out_dir, SETTINGS_FILE)
  if not os.path.exists(path):
    if os.listdir(out_dir):
      raise InputError(f"{out_dir} holds files but no {SETTINGS_FILE}, so it "
                       f"was not made by {tool}; give a new or empty "
                       "--out.")
    fileio.atomic_write_text(path, json.dumps(settings, indent=1))
    return
  try:
    with open(path, encoding="utf-8") as fh:
      old = json.load(fh)
  except ValueError:
    raise InputError(f"{path} is damaged (not JSON); give a new --out.") from None
  changed = [k for k in sorted(set(old) | set(settings))
             if old.get(k) != settings.get(k)]
  if changed:
    what = "; ".join(f"{k}: {show_value(old.get(k))} there, "
                     f"{show_value(settings.get(k))} now" for k in changed)
    raise InputError(f"{out_dir} holds rows made with other settings ({what}); "
                     "give a new --out, or the same settings to resume.")



def read_rows(path: str, fields, key) -> dict:
  """{key(row): row} of the rows in `path`, each with exactly `fields`; a
  partial last line (a killed write) is truncated away."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as fh:
    data = fh.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    os.truncate(path, end)
  rows = {}
  for number, line in enumerate(data[:end].split(b"\n")[:-1], 1):
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if not isinstance(row, dict) or sorted(row) != sorted(fields):
      raise InputError(f"{path} line {number} is not a generation row (the "
                       "file was edited or damaged); give a new --out.")
    k = key(row)
    if k in rows:
      raise InputError(f"{path} line {number} repeats the row {k}; the file "
                       "was edited or written by two runs; give a new --out.")
    rows[k] = row
  return rows


def append_row(fh, row: dict) -> None:
  """One JSON line, flushed to disk before the next row is made."""
  fh.write(json.dumps(row).encode() + b"\n")
  fh.flush()
  os.fsync(fh.fileno())



def lock_dir(out_dir: str, tool: str = "completions") -> int:
  """Locks OUT so two runs never append to one file (a kill releases it)."""
  import fcntl  # pylint: disable=import-outside-toplevel
  fd = os.open(out_dir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise InputError(f"another {tool} run is writing {out_dir}; wait "
                     "for it or give another --out.") from None
  return fd



def timed_generate(model, ids_BxP, compiled: set, **kwargs):
  """(GenerateOutput, seconds per row): one `generate` call timed by the
  wall clock, its program compiled first by an untimed call when `compiled`
  (the (mode, shape) pairs run so far; updated) has not seen it."""
  from dynamo_jax.decoding.generate import generate  # pylint: disable=import-outside-toplevel
  shape = (kwargs.get("mode", "ar"), ids_BxP.shape)
  if shape not in compiled:  # compile outside the timed call
    generate(model.config, model.params, ids_BxP, **kwargs)
    compiled.add(shape)
  start = time.perf_counter()
  out = generate(model.config, model.params, ids_BxP, **kwargs)
  return out, (time.perf_counter() - start) / ids_BxP.shape[0]


def row_counts(out, b: int) -> tuple[list[int], int, float]:
  """(token ids, forward passes, tokens per pass) of row b of a
  GenerateOutput: the passes counted are those made while row b decoded."""
  accepted = out.accepted[b]
  passes = int((accepted > 0).sum())
  return ([int(t) for t in out.tokens[b]], passes,
          float(accepted.sum()) / max(passes, 1))


def sampling_kwargs(model, mode: str, eps_b, settings: dict, seeds) -> dict:
  """generate's keywords for one setting: the sampling settings, eps_b and
  the model's co-occurrence table in mode "dynamo"."""
  kwargs = dict(max_new_tokens=settings["max_new_tokens"], mode=mode,
                temperature=settings["temperature"], seed=list(seeds))
  if mode == "dynamo":
    kwargs.update(eps_b=eps_b, cooc=model.cooc)
  return kwargs


