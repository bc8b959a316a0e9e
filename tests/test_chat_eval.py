"""`eval chat` (evaluation/chat_eval.py, chat_answers.py, chat_report.py) end
to end on the embedded DynaMo-T3 against a judge served on 127.0.0.1 by the
test (tests/judge_server.py), offline on CPU: 3 questions (one with two
turns) x 2 seeds x AR, verified and eps_b {0, 0.5, 1}, 8 new tokens.

The table is checked against a brute-force recount from the output files
and the judge's own verdict rule: transcripts rebuilt from answers.jsonl,
outcomes from the verdicts of both orders, speed-ups from the rows'
seconds and passes. Turn 2 is asked after the same setting's own turn-1
answer, through the chat template.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os

import numpy as np
import pytest

import dynamo_jax
from dynamo_jax import api
from dynamo_jax.chat.template import render
from dynamo_jax.errors import InputError
from dynamo_jax.chat.template import chat_template
from dynamo_jax.evaluation import chat_answers, chat_eval
from dynamo_jax.evaluation.judge import PairwiseJudge
from tests.judge_server import chat_reply, serve, shown

KEY_ENV = "DYNAMO_TEST_CHAT_JUDGE_KEY"
KEY = "sk-chat-test-0a1b2c3d-secret"
QUESTIONS = [
    {"question_id": 81, "category": "counsel", "turns": [
        "My brother hath wronged me. Shall I forgive him?",
        "And if he wrong me again, what then?"], "reference": ["ignored"]},
    {"question_id": "q2", "category": "nature",
     "turns": ["Describe the spring in a quiet valley."]},
    {"question_id": 7, "category": "nature",
     "turns": ["Tell of a storm upon the hills by night."]},
]
GRID = (0.0, 0.5, 1.0)
SEEDS = (0, 1)


def _verdict(first: str, second: str) -> str:
  """The test judge's rule: the larger first sha256 byte wins, near values
  tie, and a first response whose byte is a multiple of 7 always gets [[A]]
  (a position bias, so the two orders sometimes disagree)."""
  a, b = (hashlib.sha256(t.encode()).digest()[0] for t in (first, second))
  if a % 7 == 0:
    return "A"
  if abs(a - b) < 20:
    return "C"
  return "A" if a > b else "B"


def _respond(body, _):
  return 200, {}, chat_reply(f"Thus I judge. [[{_verdict(*shown(body))}]]")


@pytest.fixture(scope="module")
def loaded():
  return dynamo_jax.load()


@pytest.fixture(scope="module")
def run(loaded, tmp_path_factory):
  """The CLI run: (out dir, its stderr, the judge server's log)."""
  tmp = tmp_path_factory.mktemp("chat")
  questions = tmp / "questions.jsonl"
  questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
  out = tmp / "out"
  with pytest.MonkeyPatch.context() as mp, serve() as server:
    mp.setattr(api, "load", lambda path_or_id=None: loaded)
    mp.setenv(KEY_ENV, KEY)
    server.respond = _respond
    parser = argparse.ArgumentParser()
    chat_eval.add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "chat", "--questions", str(questions), "--seeds", "2",
        "--eps-b-grid", ",".join(map(str, GRID)), "--max-new-tokens", "8",
        "--pad-multiple", "128", "--judge-url", server.url, "--judge-model",
        "judge-model", "--api-key-env", KEY_ENV, "--bootstrap", "50",
        "--workers", "2", "--out", str(out)])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      table = args.func(args)
    yield out, err.getvalue(), list(server.log), table


def _answers(out):
  with open(out / chat_answers.ANSWERS_FILE) as fh:
    return [json.loads(line) for line in fh]


def test_outputs_and_turns(run, loaded):
  out, err, log, table = run
  assert sorted(os.listdir(out)) == sorted([
      "answers.jsonl", "run.json", "judge_cache", "conversations.jsonl",
      "table.json", "table.md", "table.csv", "winrate_vs_speedup.png"])
  assert (out / "winrate_vs_speedup.png").read_bytes()[:4] == b"\x89PNG"
  assert "using dynamo_jax's default (### Question: / ### Answer:)" in err
  assert json.loads((out / "table.json").read_text()) == table
  rows = _answers(out)
  settings = [("ar", None), ("verified", None)] + [("dynamo", e) for e in GRID]
  assert len(rows) == len(settings) * len(SEEDS) * 4  # 4 turns in all
  assert sorted({(r["mode"], r["eps_b"]) for r in rows},
                key=str) == sorted(settings, key=str)
  by_key = {(r["question_id"], r["turn"], r["seed"], r["mode"], r["eps_b"]): r
            for r in rows}
  q1 = QUESTIONS[0]["turns"]
  for (qid, turn, seed, mode, eps), r in by_key.items():
    assert r["pad"] + len(r["prompt_ids"]) == 128 and r["truncated"] == 0
    assert r["prompt_ids"] == loaded.tokenizer.encode(r["prompt"])
    if turn == 2:  # asked after the same setting's own turn-1 answer
      first = by_key[(qid, 1, seed, mode, eps)]
      assert r["prompt"] == render(loaded.tokenizer, [
          {"role": "user", "content": q1[0]},
          {"role": "assistant", "content": first["text"]},
          {"role": "user", "content": q1[1]}], add_generation_prompt=True)
    # eps_b 1 is AR bit for bit (exact_head1), so its conversations are AR's.
    if mode == "dynamo" and eps == 1.0:
      assert r["token_ids"] == by_key[(qid, turn, seed, "ar", None)][
          "token_ids"]
    assert r["text"] == loaded.tokenizer.decode(r["token_ids"]).strip() or (
        r["stop"] != "length")
  # Every request showed two different conversations; the key was sent.
  assert log and all(len(set(shown(e["body"]))) == 2 for e in log)
  assert {e["auth"] for e in log} == {f"Bearer {KEY}"}
  for dirpath, _, files in os.walk(out):
    for name in files:
      assert KEY.encode() not in (out / dirpath / name).read_bytes()


def _transcript(turns):
  if len(turns) == 1:
    return turns[0]
  return "\n\n".join(f"[Turn {t}]\n{x}" for t, x in enumerate(turns, 1))


def test_table_against_brute_force_recount(run):
  out, _, log, table = run
  rows = _answers(out)
  conv = {}
  for r in sorted(rows, key=lambda r: r["turn"]):
    c = conv.setdefault((r["question_id"], r["seed"], r["mode"], r["eps_b"]),
                        {"texts": [], "seconds": 0.0, "passes": 0,
                         "tokens": 0.0, "category": r["category"]})
    c["texts"].append(r["text"])
    c["seconds"] += r["seconds"]
    c["passes"] += r["forward_passes"]
    c["tokens"] += r["tokens_per_pass"] * r["forward_passes"]
  asked = 0
  counts = {}
  for (qid, seed, mode, eps), c in conv.items():
    ar = conv[(qid, seed, "ar", None)]
    for cat in ("all", c["category"]):
      g = counts.setdefault((cat, mode, eps), {
          "win": 0, "loss": 0, "tie": 0, "seconds": 0.0, "ar_seconds": 0.0,
          "passes": 0, "tokens": 0.0})
      g["seconds"] += c["seconds"]
      g["ar_seconds"] += ar["seconds"]
      g["passes"] += c["passes"]
      g["tokens"] += c["tokens"]
      if mode == "ar":
        continue
      mine, theirs = _transcript(c["texts"]), _transcript(ar["texts"])
      if mine == theirs:
        g["tie"] += 1
        continue
      asked += cat == "all"
      one, two = _verdict(mine, theirs), _verdict(theirs, mine)
      g["win" if (one, two) == ("A", "B") else "loss" if (one, two) == (
          "B", "A") else "tie"] += 1
  assert len(log) == 2 * asked  # each different pair, both orders, once
  with open(out / "table.csv") as fh:
    csv_rows = {(r["category"], r["mode"],
                 float(r["eps_b"]) if r["eps_b"] else None): r
                for r in csv.DictReader(fh)}
  assert set(csv_rows) == set(counts)
  assert {cat for cat, _, _ in counts} == {"all", "counsel", "nature"}
  for key, g in counts.items():
    got = csv_rows[key]
    assert float(got["speedup_wall_clock"]) == pytest.approx(
        g["ar_seconds"] / g["seconds"], rel=1e-9)
    assert float(got["tokens_per_pass"]) == pytest.approx(
        g["tokens"] / g["passes"], rel=1e-9)
    if key[1] == "ar":
      assert got["wins"] == got["win_rate"] == ""
      continue
    assert (int(got["wins"]), int(got["losses"]), int(got["ties"])) == (
        g["win"], g["loss"], g["tie"]), key
    if g["loss"]:
      assert float(got["win_rate"]) == pytest.approx(g["win"] / g["loss"])
    else:
      assert got["win_rate"] == ""
    json_group = next(x for x in table["categories"][key[0]]["groups"]
                      if (x["mode"], x["eps_b"]) == key[1:])
    assert (json_group["wins"], json_group["losses"]) == (g["win"], g["loss"])
  # eps_b 1 is AR: all ties, none asked.
  assert counts[("all", "dynamo", 1.0)]["tie"] == 3 * len(SEEDS)
  # The judge's rule gives wins and losses (so win rates are checked, not
  # only their absence) on these texts.
  assert any(g["win"] and g["loss"] for g in counts.values())
  # Same-quality speed-up: where numpy's least-squares line of win rate on
  # speed-up crosses 1, over DynaMo's groups with a win rate.
  for cat in ("all", "counsel", "nature"):
    for name, field in (("wall_clock", "ar_seconds"),
                        ("tokens_per_pass", "tokens")):
      pts = [((g["ar_seconds"] / g["seconds"]) if field == "ar_seconds"
              else g["tokens"] / g["passes"], g["win"] / g["loss"])
             for (c, mode, _), g in counts.items()
             if c == cat and mode == "dynamo" and g["loss"]]
      got = table["categories"][cat]["same_quality_speedup"]["dynamo"][name]
      if len({x for x, _ in pts}) < 2 or len({y for _, y in pts}) < 2:
        assert got["point"] is None
        continue
      slope, intercept = np.polyfit(*np.asarray(pts).T, 1)
      assert got["point"] == pytest.approx((1 - intercept) / slope, rel=1e-6)


def test_rerun_asks_nothing_and_makes_nothing(run, loaded):
  out, _, _, table = run
  before = (out / chat_answers.ANSWERS_FILE).read_bytes()
  with serve() as fresh:
    fresh.respond = _respond
    judge = PairwiseJudge(fresh.url, "judge-model", api_key_env=KEY_ENV,
                          cache_dir=str(out / "judge_cache"))
    again = chat_eval.run_chat(
        loaded, chat_answers.read_questions(str(out.parent /
                                                "questions.jsonl")),
        out_dir=str(out), seeds=2, eps_b_grid=GRID, max_new_tokens=8,
        pad_multiple=128, judge=judge, bootstrap=50, progress=False)
  assert not fresh.log and judge.requests == 0 and judge.cache_hits > 0
  assert (out / chat_answers.ANSWERS_FILE).read_bytes() == before
  assert again["categories"] == table["categories"]
  with pytest.raises(InputError, match="other settings"):
    chat_eval.run_chat(loaded, QUESTIONS[:2], out_dir=str(out), seeds=2,
                       eps_b_grid=GRID, max_new_tokens=8, pad_multiple=128,
                       progress=False)


@pytest.mark.parametrize("text, expect", [
    ("not json\n", "line 1 is not JSON"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
    ('{"question_id": 1, "category": "c"}\n', 'line 1 has no "turns"'),
    ('{"question_id": 1, "category": "c", "turns": "hi"}\n',
     '"turns" must be a non-empty list of non-empty strings'),
    ('{"question_id": 1, "category": "c", "turns": ["a", 2]}\n',
     '"turns" must be a non-empty list'),
    ('{"category": "c", "turns": ["a"]}\n', "line 1 has no question_id"),
    ('{"question_id": 1, "turns": ["a"]}\n', "line 1 has no category"),
    ('{"question_id": 1, "category": "c", "turns": ["a"]}\n\n'
     '{"question_id": 1, "category": "d", "turns": ["b"]}\n',
     "line 3 repeats question_id 1 (first on line 1)"),
    ("\n\n", "holds no questions"),
])
def test_bad_question_files(tmp_path, text, expect):
  path = tmp_path / "q.jsonl"
  path.write_text(text)
  with pytest.raises(InputError, match="q.jsonl") as e:
    chat_answers.read_questions(str(path))
  assert expect in str(e.value)


def test_default_questions():
  questions = chat_answers.read_questions(
      chat_answers.default_questions_path())
  assert 20 <= len(questions) <= 30
  assert len({q["category"] for q in questions}) >= 4
  assert any(len(q["turns"]) > 1 for q in questions)


def test_prompt_padding_and_answer_cut(loaded):
  assert chat_answers.fed_prompt([5, 6, 7], 10, 4, 0) == ([0, 5, 6, 7], 1, 0)
  assert chat_answers.fed_prompt([5, 6, 7, 8], 10, 4, 0) == ([5, 6, 7, 8], 0,
                                                             0)
  assert chat_answers.fed_prompt(list(range(1, 13)), 10, 4, 0) == (
      list(range(3, 13)), 0, 2)  # the last 10 kept; 10 is the cap
  with pytest.raises(InputError, match="--pad-multiple 1"):
    chat_answers.fed_prompt([5], 10, 4, None)
  tok = loaded.tokenizer
  header = chat_answers.user_header(tok, chat_template(tok)[0])
  assert header == "### Question:"
  ids = tok.encode("Yea, my lord")
  assert chat_answers.cut_answer(tok, ids + [0] + ids, 0, header) == (
      "Yea, my lord", "eos")
  more = tok.encode(" truly\n\n### Question:\nWhat else?")
  assert chat_answers.cut_answer(tok, ids + more, 0, header) == (
      "Yea, my lord truly", "turn")
  assert chat_answers.cut_answer(tok, ids, 0, header) == ("Yea, my lord",
                                                          "length")

