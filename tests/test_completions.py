"""`eval completions` (evaluation/completions.py) on the embedded DynaMo-T3:
2 prompts x 2 seeds x eps_b {0, 1}, 8 new tokens, offline on CPU.

Checked exactly: the rows' format; eps_b = 1 gives AR's tokens at the same
seed (exact_head1, generate's default, makes DynaMo's head 1 AR's bit for
bit); a row is what generate(..., seed=[seed]) gives; resuming makes only
the missing rows; a kill -9 mid-run followed by a re-run gives the whole
file, without duplicates or a partial line; other settings are refused.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import dynamo_jax
from dynamo_jax.api import Model
from dynamo_jax.errors import InputError
from dynamo_jax.evaluation import completions
from dynamo_jax.model.config import tiny_config

generate_module = importlib.import_module("dynamo_jax.decoding.generate")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two of the paper's prompts with the same token count (2): one compiled
# program per mode.
PROMPTS = ["What will", "Do not"]
SETUP = dict(seeds=2, eps_b_grid=[0.0, 1.0], max_new_tokens=8, progress=False)
ROWS = 2 * 2 * (1 + 1 + 2)  # prompts x seeds x (ar, verified, 2 eps_b)


def _rows(out_dir):
  with open(os.path.join(out_dir, completions.ROWS_FILE), "rb") as fh:
    data = fh.read()
  assert data.endswith(b"\n")
  return [json.loads(line) for line in data.splitlines()]


def _key(row):
  return (row["prompt_id"], row["seed"], row["mode"], row["eps_b"])


def _cli(argv):
  parser = argparse.ArgumentParser()
  completions.add_parser(parser.add_subparsers())
  args = parser.parse_args(["completions", *argv])
  return args.func(args)


@pytest.fixture(scope="module")
def model():
  return dynamo_jax.load()


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
  out = tmp_path_factory.mktemp("finished") / "out"
  path = completions.run_completions(model, PROMPTS, out_dir=str(out), **SETUP)
  assert path == str(out / completions.ROWS_FILE)
  return out


def test_defaults():
  assert len(completions.PAPER_PROMPTS) == 10
  assert completions.PAPER_PROMPTS[3] == "How can we"
  grid = completions.PAPER_EPS_B_GRID
  assert len(grid) == 51 and grid[0] == 0.0 and grid[-1] == 1.0
  assert grid[1] == 0.02 and grid[25] == 0.5
  parser = argparse.ArgumentParser()
  completions.add_parser(parser.add_subparsers())
  args = parser.parse_args(["completions", "--out", "x"])
  assert (args.seeds, args.temperature, args.no_verified, args.batch_seeds,
          args.model) == (10, 0.7, False, False, None)


def test_rows_complete_and_well_formed(finished, model):
  rows = _rows(finished)
  assert len(rows) == ROWS
  assert len({_key(r) for r in rows}) == ROWS
  for r in rows:
    assert list(r) == list(completions.FIELDS)
    assert r["prompt"] == PROMPTS[r["prompt_id"]] and r["model"] is None
    assert r["prompt_ids"] == model.tokenizer.encode(r["prompt"])
    assert len(r["token_ids"]) == 8
    assert r["text"] == model.tokenizer.decode(r["token_ids"])
    assert (r["eps_b"] is None) == (r["mode"] != "dynamo")
    assert r["seconds"] > 0 and 1 <= r["forward_passes"] <= 8
    assert 1.0 <= r["tokens_per_pass"] <= 3.0
    if r["mode"] == "ar" or r["eps_b"] == 1.0:
      assert (r["forward_passes"], r["tokens_per_pass"]) == (8, 1.0)
  # eps_b = 0 emits several tokens per pass.
  assert max(r["tokens_per_pass"] for r in rows if r["eps_b"] == 0.0) > 1.5
  with open(finished / completions.SETTINGS_FILE) as fh:
    settings = json.load(fh)
  assert settings["prompts"] == PROMPTS and settings["cooc_table"] is True
  assert settings["generate_defaults"]["repetition_penalty"] == 1.1


def test_eps_b_one_is_ar_and_rows_reproduce(finished, model):
  rows = {_key(r): r for r in _rows(finished)}
  for p in range(2):
    for s in range(2):
      ar = rows[(p, s, "ar", None)]["token_ids"]
      assert rows[(p, s, "dynamo", 1.0)]["token_ids"] == ar
      assert rows[(p, s, "dynamo", 0.0)]["token_ids"] != ar
  row = rows[(1, 1, "dynamo", 0.0)]
  out = dynamo_jax.generate(model.config, model.params, [row["prompt_ids"]],
                            max_new_tokens=8, mode="dynamo", eps_b=0.0,
                            seed=[1], cooc=model.cooc)
  assert out.tokens[0].tolist() == row["token_ids"]
  assert out.forward_passes == row["forward_passes"]


def test_resume_makes_only_missing_rows(finished, model, tmp_path,
                                        monkeypatch):
  out = tmp_path / "out"
  shutil.copytree(finished, out)
  path = out / completions.ROWS_FILE
  before = path.read_bytes()
  calls = []
  real = generate_module.generate

  @functools.wraps(real)  # completions records generate's defaults
  def counting(config, params, ids, **kw):
    calls.append((kw["mode"], kw.get("eps_b"), tuple(kw["seed"])))
    return real(config, params, ids, **kw)

  monkeypatch.setattr(generate_module, "generate", counting)
  completions.run_completions(model, PROMPTS, out_dir=str(out), **SETUP)
  assert not calls and path.read_bytes() == before
  # Without the last 3 rows: only they are made again, with the same tokens.
  lines = before.splitlines(keepends=True)
  path.write_bytes(b"".join(lines[:-3]))
  completions.run_completions(model, PROMPTS, out_dir=str(out), **SETUP)
  assert {c[:2] for c in calls} == {("dynamo", 1.0)}
  assert {c[2] for c in calls} <= {(0,), (1,)}
  assert len(calls) == 3 + 1  # + one untimed compile run
  again = _rows(out)
  assert [_key(r) for r in again] == [_key(json.loads(x)) for x in lines]
  assert [r["token_ids"] for r in again[-3:]] == [
      json.loads(x)["token_ids"] for x in lines[-3:]]
  # A larger grid only adds its rows.
  calls.clear()
  completions.run_completions(model, PROMPTS, out_dir=str(out),
                              **{**SETUP, "eps_b_grid": [0.0, 0.5, 1.0]})
  assert {c[:2] for c in calls} == {("dynamo", 0.5)}
  assert len(_rows(out)) == ROWS + 4


def test_kill_then_rerun_completes(finished, tmp_path):
  out = tmp_path / "out"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n\n")
  argv = ["--prompts", str(prompts), "--seeds", "2", "--eps-b-grid", "0,1",
          "--max-new-tokens", "8", "--out", str(out)]
  script = ("import argparse, sys; from dynamo_jax.evaluation import "
            "completions as c; p = argparse.ArgumentParser(); "
            "c.add_parser(p.add_subparsers()); "
            "a = p.parse_args(['completions'] + sys.argv[1:]); a.func(a)")
  proc = subprocess.Popen(
      [sys.executable, "-c", script, *argv], cwd=str(tmp_path),
      env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rows_file = out / completions.ROWS_FILE
  end = time.monotonic() + 120
  while not (rows_file.exists() and rows_file.read_bytes().count(b"\n")):
    assert proc.poll() is None, "ended before writing a row"
    assert time.monotonic() < end, "no row after 120 s"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = rows_file.read_bytes().count(b"\n")
  assert 1 <= written < ROWS  # killed mid-run
  with open(rows_file, "ab") as fh:  # as a kill in the middle of a write
    fh.write(b'{"prompt_id": 1, "prompt": "Do n')
  _cli(argv)
  rows = _rows(out)
  assert len(rows) == ROWS and len({_key(r) for r in rows}) == ROWS
  want = {_key(r): r["token_ids"] for r in _rows(finished)}
  assert {_key(r): r["token_ids"] for r in rows} == want


def test_other_settings_refused(finished, model, tmp_path):
  out = tmp_path / "out"
  shutil.copytree(finished, out)
  before = (out / completions.ROWS_FILE).read_bytes()
  for change, named in ((dict(temperature=0.8), "temperature"),
                        (dict(max_new_tokens=9), "max_new_tokens"),
                        (dict(batch_seeds=True), "batch_seeds"),
                        (dict(model_name="other"), "model")):
    with pytest.raises(InputError, match=f"other settings.*{named}"):
      completions.run_completions(model, PROMPTS, out_dir=str(out),
                                  **{**SETUP, **change})
  with pytest.raises(InputError, match="prompts"):
    completions.run_completions(model, PROMPTS[::-1], out_dir=str(out),
                                **SETUP)
  assert (out / completions.ROWS_FILE).read_bytes() == before


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("name,data,match", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"\n  \n", "holds no prompts"),
    ("p.csv", b"prompt\nHow can we\n", "must be .txt"),
    ("p.jsonl", b'{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
    ("q.jsonl", b'{"text": "a"}\n', "line 1 has no non-empty \"prompt\""),
    ("r.jsonl", b'\n{"prompt": " "}\n', "line 2 has no non-empty"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
])
def test_bad_prompts_files(tmp_path, name, data, match):
  if data is not None:
    (tmp_path / name).write_bytes(data)
  with pytest.raises(InputError, match=match) as e:
    completions.read_prompts(str(tmp_path / name))
  _one_line(e)


def test_plan_and_batched_calls():
  keys = completions.plan(2, [0, 1], [0.0, 1.0], verified=False)
  assert keys[:3] == [(0, 0, "ar", None), (0, 1, "ar", None),
                      (1, 0, "ar", None)]
  assert keys[-1] == (1, 1, "dynamo", 1.0) and len(keys) == 12
  todo = keys[1:]  # (0, 0, "ar") already made
  assert len(completions._calls(todo, batch_seeds=False)) == 11
  batched = completions._calls(todo, batch_seeds=True)
  assert batched[:2] == [(0, "ar", None, [1]), (1, "ar", None, [0, 1])]
  assert len(batched) == 6


def test_prompts_files_read(tmp_path):
  (tmp_path / "p.txt").write_text("How can we\r\n\n Do not \n")
  assert completions.read_prompts(str(tmp_path / "p.txt")) == [
      "How can we", " Do not "]
  (tmp_path / "p.jsonl").write_text('{"prompt": "a b", "id": 3}\n\n'
                                    '{"prompt": "c"}\n')
  assert completions.read_prompts(str(tmp_path / "p.jsonl")) == ["a b", "c"]


@pytest.mark.parametrize("text,match", [
    ("0,1.5", "must lie in"), ("-0.1", "must lie in"), ("0,x", "not a number"),
    ("", "not a number"), ("nan", "must lie in")])
def test_bad_eps_b_grid(text, match):
  with pytest.raises(InputError, match=match) as e:
    completions.parse_eps_b_grid(text)
  _one_line(e)
  assert completions.parse_eps_b_grid("1, 0,0.5,0") == [0.0, 0.5, 1.0]


def test_bad_run_arguments(tmp_path):
  (tmp_path / "file").write_text("x")
  # Refused before any model is loaded (model=None would load the default).
  for kw, match in ((dict(out_dir=str(tmp_path / "file")), "is a file"),
                    (dict(eps_b_grid=[0.5, 2.0]), "must lie in"),
                    (dict(seeds=0), "seeds must be"),
                    (dict(temperature=0.0), "temperature")):
    with pytest.raises(InputError, match=match) as e:
      completions.run_completions(None, PROMPTS, **{
          "out_dir": str(tmp_path / "o"), **kw})
    _one_line(e)
  config = tiny_config(num_token_heads=1)
  one_head = Model(config, None, None)  # refused before params are used
  with pytest.raises(InputError, match="num_token_heads n >= 2") as e:
    completions.run_completions(one_head, PROMPTS, out_dir=str(tmp_path / "o"))
  _one_line(e)
  assert not (tmp_path / "o").exists()


def test_foreign_directory_refused(model, tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(InputError, match="not made by completions") as e:
    completions.run_completions(model, PROMPTS, out_dir=str(tmp_path), **SETUP)
  _one_line(e)
  assert os.listdir(tmp_path) == ["notes.txt"]
