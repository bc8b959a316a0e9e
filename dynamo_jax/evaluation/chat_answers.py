"""The answers of `eval chat`: Vicuna / MT-Bench questions answered by one
model in every decoding setting, turn by turn, through its chat template.

Questions (`read_questions`): JSONL, one object per line with question_id
(an int or a string, unique), category (a string) and turns (a non-empty
list of strings): MT-Bench's and Vicuna's question.jsonl; other fields are
ignored. Turn t of a conversation is asked after the model's own answers to
turns 1..t-1 in the same setting and seed: the prompt is
`render(tokenizer, [user 1, assistant 1, ..., user t],
add_generation_prompt=True)`.

A prompt is left-padded with EOS to a multiple of `pad_multiple` tokens, so
prompts of nearby lengths share one compiled program (generate compiles
per prompt length: seconds to tens of seconds each on CPU). EOS is the
document separator the model was trained with, so the padding reads as
"a new document starts here"; every setting gets the same padded prompt,
and pad_multiple 1 turns it off. A later turn whose prompt no longer fits
the model's positions keeps its last tokens ("truncated" counts the rest);
a first turn that does not fit is refused before anything is generated.

Every call generates max_new_tokens tokens (generate has no stop token), so
the wall-clock of all settings covers the same number of tokens. The
answer is the text before the first EOS token (the template's end of an
assistant turn) or before the template's user-turn header (a model that
was not tuned to chat goes on to write the next question itself); "stop"
says which ended it ("eos", "turn" or "length").

OUT/answers.jsonl holds one JSON object per answered turn with exactly
FIELDS; rows are appended as made and a re-run skips those present (the
resumable directory of rundir.py).
"""
from __future__ import annotations

import json
import os

from dynamo_jax.errors import InputError
from dynamo_jax.evaluation import rundir

ANSWERS_FILE = "answers.jsonl"
FIELDS = ("question_id", "category", "turn", "seed", "mode", "eps_b",
          "prompt", "prompt_ids", "pad", "truncated", "text", "stop",
          "answer_ids", "token_ids", "forward_passes", "tokens_per_pass",
          "seconds", "model")
_SHAPE = ("one {\"question_id\": ..., \"category\": ..., \"turns\": [...]} "
          "object per line (MT-Bench's question.jsonl)")


def read_questions(path: str) -> list[dict]:
  """[{"question_id", "category", "turns"}] of a questions file, each line
  checked; errors name the file and the line."""
  try:
    with open(path, encoding="utf-8") as fh:
      lines = fh.read().split("\n")
  except FileNotFoundError:
    raise InputError(f"questions file {path} does not exist.") from None
  except UnicodeDecodeError:
    raise InputError(f"questions file {path} is not UTF-8 text.") from None
  except OSError as e:
    raise InputError(f"cannot read questions file {path}: "
                     f"{e.strerror or e}.") from None
  questions, seen = [], {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    try:
      record = json.loads(line)
    except ValueError:
      raise InputError(f"{where} is not JSON; a questions file is JSONL, "
                       f"{_SHAPE}.") from None
    if not isinstance(record, dict):
      raise InputError(f"{where} is not a JSON object; a questions file "
                       f"holds {_SHAPE}.")
    qid, category, turns = (record.get(k) for k in
                            ("question_id", "category", "turns"))
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
      raise InputError(f"{where} has no question_id (an int or a string).")
    if not isinstance(category, str) or not category.strip():
      raise InputError(f"{where} has no category (a non-empty string).")
    if "turns" not in record:
      raise InputError(f"{where} has no \"turns\" (the list of the user's "
                       "messages).")
    if not isinstance(turns, list) or not turns or not all(
        isinstance(t, str) and t.strip() for t in turns):
      raise InputError(f"{where}: \"turns\" must be a non-empty list of "
                       "non-empty strings.")
    if qid in seen:
      raise InputError(f"{where} repeats question_id {qid!r} (first on line "
                       f"{seen[qid]}); question ids must be unique.")
    seen[qid] = number
    questions.append({"question_id": qid, "category": category,
                      "turns": list(turns)})
  if not questions:
    raise InputError(f"questions file {path} holds no questions; it holds "
                     f"{_SHAPE}.")
  return questions


def default_questions_path() -> str:
  """The project's own questions (package data), in the embedded model's
  Early Modern English."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                      "chat_questions.jsonl")


def user_header(tokenizer, template: str) -> str:
  """The text the template writes before a user message (stripped; "" when
  it writes nothing recognisable): an answer ends where it begins."""
  from dynamo_jax.chat.template import render  # pylint: disable=import-outside-toplevel
  sentinel = "\u2063sentinel\u2063"
  text = render(tokenizer, [{"role": "user", "content": sentinel}],
                add_generation_prompt=False, template=template)
  return text[:text.find(sentinel)].strip() if sentinel in text else ""


def max_prompt(config, max_new_tokens: int) -> int:
  """The longest prompt generate takes with max_new_tokens (its last chunk
  fed starts at P + G - 1 and holds up to n - 1 tokens)."""
  return (config.max_position_embeddings - max_new_tokens
          - config.num_token_heads + 1)


def check_first_turns(model, questions, template, max_new_tokens) -> None:
  """Refuses a question whose first turn alone does not fit the model."""
  from dynamo_jax.chat.template import render  # pylint: disable=import-outside-toplevel
  limit = max_prompt(model.config, max_new_tokens)
  for q in questions:
    text = render(model.tokenizer, [{"role": "user", "content": q["turns"][0]}],
                  add_generation_prompt=True, template=template)
    n = len(model.tokenizer.encode(text))
    if n > limit:
      raise InputError(
          f"question {q['question_id']!r}: its first turn is {n} tokens "
          f"through the chat template; with max_new_tokens {max_new_tokens} "
          f"the model's {model.config.max_position_embeddings} positions "
          f"allow {limit}. Ask for fewer tokens or shorten the question.")


def fed_prompt(ids: list[int], limit: int, pad_multiple: int, eos_id):
  """(ids fed, pad, truncated): the last `limit` tokens, left-padded with
  EOS to a multiple of pad_multiple (at most `limit` long)."""
  truncated = max(0, len(ids) - limit)
  ids = ids[truncated:]
  width = min(-(-len(ids) // pad_multiple) * pad_multiple, limit)
  pad = width - len(ids)
  if pad and eos_id is None:
    raise InputError("the tokenizer has no EOS token to pad prompts with; "
                     "give --pad-multiple 1.")
  return [eos_id] * pad + ids, pad, truncated


def cut_answer(tokenizer, tokens: list[int], eos_id, header: str):
  """(answer text, stop) of the generated tokens (module docstring)."""
  end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
  text, stop = tokenizer.decode(tokens[:end]), ("eos" if end < len(tokens)
                                                 else "length")
  if header and header in text:
    text, stop = text[:text.index(header)], "turn"
  return text.strip(), stop


def row_key(row: dict) -> tuple:
  return (row["question_id"], row["turn"], row["seed"], row["mode"],
          None if row["eps_b"] is None else float(row["eps_b"]))


def settings_plan(eps_b_grid, verified: bool) -> list[tuple]:
  """(mode, eps_b) of every setting: AR first, then verified, then DynaMo."""
  return ([("ar", None)] + ([("verified", None)] if verified else [])
          + [("dynamo", float(e)) for e in eps_b_grid])


def make_answers(model, questions, plan, seeds, *, out_dir: str,
                 settings: dict, template: str, pad_multiple: int,
                 progress: bool = True) -> list[dict]:
  """Answers every turn of every question at every (mode, eps_b) of `plan`
  and seed, appending the rows missing from OUT/answers.jsonl; returns all
  rows of the plan, in plan order."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from tqdm.auto import tqdm
  from dynamo_jax.chat.template import render
  path = os.path.join(out_dir, ANSWERS_FILE)
  done = rundir.read_rows(path, FIELDS, row_key)
  tok = model.tokenizer
  eos_id = getattr(tok, "eos_token_id", None)
  header = user_header(tok, template)
  limit = max_prompt(model.config, settings["max_new_tokens"])
  total = len(plan) * len(seeds) * sum(len(q["turns"]) for q in questions)
  out, compiled = [], set()
  bar = tqdm(total=total, desc="chat answers", unit="turn",
             disable=not progress)
  with open(path, "ab") as fh, bar:
    for mode, eps in plan:
      bar.set_postfix_str(mode if eps is None else f"{mode} eps_b={eps:g}")
      for q in questions:
        for seed in seeds:
          messages = []
          for turn, question in enumerate(q["turns"], 1):
            messages.append({"role": "user", "content": question})
            key = (q["question_id"], turn, seed, mode, eps)
            row = done.get(key)
            if row is None:
              prompt = render(tok, messages, add_generation_prompt=True,
                              template=template)
              ids, pad, truncated = fed_prompt(
                  [int(t) for t in tok.encode(prompt)], limit, pad_multiple,
                  eos_id)
              result, seconds = rundir.timed_generate(
                  model, np.asarray([ids], np.int32), compiled,
                  **rundir.sampling_kwargs(model, mode, eps, settings, [seed]))
              tokens, passes, tokens_per_pass = rundir.row_counts(result, 0)
              text, stop = cut_answer(tok, tokens, eos_id, header)
              row = dict(
                  question_id=q["question_id"], category=q["category"],
                  turn=turn, seed=seed, mode=mode, eps_b=eps, prompt=prompt,
                  prompt_ids=ids[pad:], pad=pad, truncated=truncated,
                  text=text, stop=stop,
                  answer_ids=[int(t) for t in tok.encode(text)] if text else [],
                  token_ids=tokens, forward_passes=passes,
                  tokens_per_pass=tokens_per_pass, seconds=seconds,
                  model=settings["model"])
              rundir.append_row(fh, row)
            messages.append({"role": "assistant", "content": row["text"]})
            out.append(row)
            bar.update(1)
  return out
