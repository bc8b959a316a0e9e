"""Alpaca-format instruction data: records -> rendered prompts and responses.

A record is {"instruction": str, "input": str (optional, may be ""),
"output": str}. Sources (`load_records`):

- a local .json file (a list of records) or .jsonl file (one per line);
- `tfds:NAME[:SPLIT]`: a prepared TensorFlow Datasets split with those three
  fields, read through `tfds.data_source` (no TensorFlow), as data/tfds_source;
- `hf:ORG/NAME[:SPLIT]`: a hub dataset through the `datasets` library, when
  it is installed (it is not a dependency of this package);
- `dynamo_jax:instructions`: the project's own set, shipped in the package
  (chat/data/instructions.jsonl, written for the embedded default model).

Validation is at load, record by record, before any training: a bad record is
one line naming the source, the record number (1-based; for .jsonl also the
line) and the field.

Held-out split: with `heldout_every` = k > 0, records k, 2k, 3k, ... (1-based,
in source order) are held out for evaluation and never trained on; the chat
configs use k = 10.

Response span (exact by construction): the prompt is the conversation without
the answer rendered with add_generation_prompt=True; the full rendering must
start with it (else ConfigError: the template cannot be used for
response-only training), and the response is the rest of the text (the
assistant content, then the template's end of turn, EOS for the default
template). Prompt and response are tokenized separately and concatenated: the
prompt's tokens are exactly those a chat front end feeds the model before it
generates, and every response token is a target; a BPE merge across the
boundary, which tokenizing the whole text at once could make, cannot blur it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from dynamo_jax.chat import template as chat_template_lib
from dynamo_jax.data.config import DataConfig, DataError
from dynamo_jax.data.instruct_packing import InstructionBatches
from dynamo_jax.data.pipeline import BatchIterator
from dynamo_jax.data.tokenize import make_encoder, resolve_eos_id
from dynamo_jax.errors import ConfigError

PROJECT_SET = "dynamo_jax:instructions"
FIELDS = ("instruction", "input", "output")
HELDOUT_EVERY = 10  # the chat configs' held-out split: every 10th record


def project_set_path() -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                      "instructions.jsonl")


# ---- records -----------------------------------------------------------------

def check_record(record: Any, where: str) -> dict[str, str]:
  """{"instruction", "input", "output"} of one record, or a one-line DataError
  naming `where` ("FILE: record N") and the field."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: is a {type(record).__name__}, not an object "
                    "with instruction / input / output.")
  out = {}
  for field in FIELDS:
    value = record.get(field)
    if value is None and field == "input":
      value = ""
    if value is None:
      raise DataError(f"{where}: field {field!r} is missing (an instruction "
                      "record needs 'instruction' and 'output').")
    if not isinstance(value, str):
      raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, "
                      "not a string.")
    out[field] = value
  if not out["instruction"].strip():
    raise DataError(f"{where}: field 'instruction' is empty.")
  if not out["output"].strip():
    raise DataError(f"{where}: field 'output' is empty: there is no response "
                    "to learn.")
  return out


def load_records(spec: str, data_dir: str | None = None
                 ) -> list[dict[str, str]]:
  """Every record of one source, checked (see the module docstring);
  `data_dir`: tfds's data directory (None: tfds's default)."""
  if spec == PROJECT_SET:
    return _read_file(project_set_path())
  if spec.startswith("tfds:"):
    return _read_tfds(spec, data_dir)
  if spec.startswith("hf:"):
    return _read_hub(spec)
  if not os.path.isfile(spec):
    raise DataError(f"instruction file {spec!r} does not exist (give a .json "
                    f"or .jsonl file, tfds:NAME[:SPLIT], hf:ORG/NAME[:SPLIT] "
                    f"or {PROJECT_SET}).")
  return _read_file(spec)


def _read_file(path: str) -> list[dict[str, str]]:
  if not path.endswith((".json", ".jsonl")):
    raise DataError(f"instruction file {path}: expected a .json (a list of "
                    "records) or .jsonl (one record per line) file.")
  try:
    with open(path, encoding="utf-8") as fh:
      text = fh.read()
  except UnicodeDecodeError as e:
    raise DataError(f"instruction file {path} is not UTF-8 text: {e}") from None
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except ValueError as e:
      raise DataError(f"instruction file {path} is not valid JSON: {e}"
                      ) from None
    if not isinstance(data, list):
      raise DataError(f"instruction file {path} must hold a JSON list of "
                      f"records, got a {type(data).__name__}.")
    return [check_record(r, f"{path}: record {n}")
            for n, r in enumerate(data, start=1)]
  records = []
  for line_no, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path}: record {len(records) + 1} (line {line_no})"
    try:
      record = json.loads(line)
    except ValueError as e:
      raise DataError(f"{where}: is not valid JSON: {e}") from None
    records.append(check_record(record, where))
  return records


def _name_split(spec: str, prefix: str) -> tuple[str, str]:
  name, _, split = spec[len(prefix):].partition(":")
  if not name:
    raise DataError(f"{spec!r}: no dataset name after {prefix!r}.")
  return name, split or "train"


def _read_tfds(spec: str, data_dir: str | None) -> list[dict[str, str]]:
  name, split = _name_split(spec, "tfds:")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"{spec} needs tensorflow-datasets: pip install "
                    "tensorflow-datasets") from None
  try:
    examples = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # tfds's own errors
    raise DataError(f"cannot open {spec}: {' '.join(str(e).split())[:300]}"
                    ) from None
  fields = list(examples.dataset_info.features.keys())
  missing = [f for f in ("instruction", "output") if f not in fields]
  if missing:
    raise DataError(f"{spec} has no field(s) {missing}; available fields: "
                    f"{fields}.")
  return [check_record({k: _text(v) for k, v in examples[i].items()
                        if k in FIELDS}, f"{spec}: record {i + 1}")
          for i in range(len(examples))]


def _text(value):
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  return value.decode("utf-8", errors="replace") if isinstance(
      value, bytes) else value


def _read_hub(spec: str) -> list[dict[str, str]]:
  name, split = _name_split(spec, "hf:")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"{spec} needs the `datasets` library, which is not "
                    "installed (pip install datasets), or save the records "
                    "as a local .jsonl file.") from None
  # The hub client logs each failed retry on stderr; the error below says
  # it once.
  loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets")]
  levels = [lg.level for lg in loggers]
  try:
    for lg in loggers:
      lg.setLevel(logging.ERROR)
    rows = datasets.load_dataset(name, split=split)
  except Exception as e:  # pylint: disable=broad-except  # network, hub, format
    raise DataError(f"cannot load {spec} with datasets: "
                    f"{' '.join(str(e).split())[:300]}") from None
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
  return [check_record(dict(r), f"{spec}: record {n}")
          for n, r in enumerate(rows, start=1)]


def split_records(records: Sequence[dict], heldout_every: int,
                  which: str) -> list[dict]:
  """"train": records not held out; "heldout": records k, 2k, ... (1-based)
  for k = heldout_every; "all". heldout_every 0 holds nothing out."""
  if which == "all" or not heldout_every:
    return list(records) if which != "heldout" else []
  held = [(n + 1) % heldout_every == 0 for n in range(len(records))]
  keep = (lambda h: h) if which == "heldout" else (lambda h: not h)
  return [r for r, h in zip(records, held) if keep(h)]


# ---- rendering and tokens ----------------------------------------------------

def to_messages(record: dict[str, str]) -> list[dict[str, str]]:
  """user = instruction (+ blank line + input, when there is one);
  assistant = output."""
  user = record["instruction"]
  if record["input"]:
    user += "\n\n" + record["input"]
  return [{"role": "user", "content": user},
          {"role": "assistant", "content": record["output"]}]


def resolve_template(tokenizer, template_path: str | None) -> tuple[str, str]:
  """(template, source): the Jinja file `template_path` when given, else
  `chat.template.chat_template(tokenizer)`."""
  if template_path is None:
    return chat_template_lib.chat_template(tokenizer)
  try:
    with open(template_path, encoding="utf-8") as fh:
      return fh.read(), template_path
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"cannot read the chat template {template_path}: {e}"
                      ) from None


def render_example(tokenizer, record: dict[str, str], template: str
                   ) -> tuple[str, str]:
  """(prompt text, response text) of one record; prompt + response is the
  full rendering."""
  messages = to_messages(record)
  prompt = chat_template_lib.render(tokenizer, messages[:1],
                                    add_generation_prompt=True,
                                    template=template)
  full = chat_template_lib.render(tokenizer, messages,
                                  add_generation_prompt=False,
                                  template=template)
  if not full.startswith(prompt) or len(full) == len(prompt):
    raise ConfigError(
        "the chat template cannot be used for response-only training: the "
        "conversation rendered with its answer does not start with the "
        "prompt rendered with add_generation_prompt=True.")
  return prompt, full[len(prompt):]


def encode_examples(encode: Callable[[Sequence[str]], list], eos_id: int,
                    pairs: Sequence[tuple[str, str]]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(ids int32 [L], loss_mask bool [L])] of (prompt, response) pairs:
  prompt tokens (False), then response tokens (True). The response must hold
  EOS, or a model trained on it would never stop."""
  flat = encode([text for pair in pairs for text in pair])
  out = []
  for prompt_ids, response_ids in zip(flat[0::2], flat[1::2]):
    if eos_id not in response_ids:
      raise ConfigError(
          f"the chat template's assistant turn does not end with EOS (id "
          f"{eos_id}): end it with {{{{ eos_token }}}}, or a fine-tuned model "
          "never learns to stop.")
    ids = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    out.append((ids, mask))
  return out


class InstructionSource:
  """The records of `specs` (the `which` split), by index: `read(indices)`
  gives [(ids int32 [L], loss_mask bool [L])], rendered with the template
  (`resolve_template`) and tokenized with `encode`."""

  def __init__(self, specs: Sequence[str], tokenizer,
               encode: Callable[[Sequence[str]], list], eos_id: int, *,
               heldout_every: int, template_path: str | None = None,
               which: str = "train", note: bool = True,
               data_dir: str | None = None):
    records = []
    for spec in specs:
      records.extend(load_records(spec, data_dir))
    self.records = split_records(records, heldout_every, which)
    if not self.records:
      raise DataError(f"no {which} instruction records in {list(specs)}.")
    self.tokenizer, self.encode, self.eos_id = tokenizer, encode, eos_id
    self.template, self.template_source = resolve_template(tokenizer,
                                                           template_path)
    if note and chat_template_lib.default_note(self.template_source):
      print(chat_template_lib.default_note(self.template_source),
            file=sys.stderr, flush=True)
    self.read([0])  # a template that does not render, or ends without EOS

  def __len__(self) -> int:
    return len(self.records)

  def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [render_example(self.tokenizer, self.records[int(i)],
                            self.template) for i in indices]
    return encode_examples(self.encode, self.eos_id, pairs)


def make_batches(data_cfg: DataConfig, tokenizer, *, batch_size: int,
                 seq_len: int, seed: int, which: str = "train",
                 note: bool = True) -> BatchIterator:
  """`data.make_batches` for source "instructions": an iterator of
  {"tokens", "segment_ids": int32, "loss_mask": bool} [batch_size, seq_len]
  (data/instruct_packing.py) over the `which` split ("train", "heldout",
  "all"), with `get_state()` / `set_state(state)`."""
  source = InstructionSource(
      data_cfg.paths, tokenizer, make_encoder(tokenizer),
      resolve_eos_id(tokenizer, data_cfg.eos_id),
      heldout_every=data_cfg.heldout_every,
      template_path=data_cfg.chat_template, which=which, note=note,
      data_dir=data_cfg.data_dir)
  packer = InstructionBatches(
      source, batch_size=batch_size, seq_len=seq_len, seed=seed,
      shuffle=data_cfg.shuffle, num_epochs=data_cfg.num_epochs)
  return BatchIterator(packer, prefetch=data_cfg.prefetch)
