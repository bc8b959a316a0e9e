"""The pairwise judge against a real HTTP server on 127.0.0.1 (started here,
scripted replies), and the judged statistics against brute-force numpy.

Offline and CPU only: the server is a ThreadingHTTPServer in a thread of this
process; NLLs use the embedded default model (loaded once per module).
"""

import argparse
import collections
import functools
import json
import logging
import math
import os
import socket
import time

import numpy as np
import pytest

import dynamo_jax
from dynamo_jax import api
from dynamo_jax.evaluation import judge as judge_lib
from dynamo_jax.evaluation import judging
from dynamo_jax.evaluation.judge import (JudgeConnectionError, JudgeError,
                                         PairwiseJudge, parse_verdict)
from dynamo_jax.fileio import temp_prefix
from tests.judge_server import chat_reply as _chat
from tests.judge_server import prefers_good, serve
from tests.judge_server import shown as _shown_pair

KEY_ENV = "DYNAMO_TEST_JUDGE_KEY"
KEY = "sk-test-9f8e7d6c5b4a-secret"


@pytest.fixture
def server():
  with serve() as srv:
    yield srv


def _judge(url, **kw):
  """A judge that never really waits: sleeps are recorded in .slept."""
  slept = []
  kw = {"api_key_env": KEY_ENV, "max_retries": 2, "backoff": 0.01,
        "sleep": slept.append, **kw}
  judge = PairwiseJudge(url, "judge-model", **kw)
  judge.slept = slept
  return judge


def _shown(entry):
  return _shown_pair(entry["body"])


def test_parse_verdict():
  assert parse_verdict("A is clearly better. [[A]]") == "A"
  assert parse_verdict("[[ B ]]") == "B"
  assert parse_verdict("At first [[A]], but on reflection [[C]]") == "C"
  for bad in ("[A]", "A", "[[D]]", "", None):
    assert parse_verdict(bad) is None


def test_order_swap_and_verdicts(server):
  judge = _judge(server.url)
  assert judge.compare("Q?", "a good answer", "a poor answer") == "a"
  first, second = server.log
  assert _shown(first) == ("a good answer", "a poor answer")
  assert _shown(second) == ("a poor answer", "a good answer")  # swapped
  assert first["path"] == "/v1/chat/completions"
  body = first["body"]
  assert body["model"] == "judge-model" and body["temperature"] == 0
  assert [m["role"] for m in body["messages"]] == ["system", "user"]
  assert "[[C]]" in body["messages"][0]["content"]
  assert judge.compare("Q?", "a poor answer", "a good answer") == "b"
  assert judge.compare("Q?", "one answer", "another answer") == "tie"  # [[C]]
  assert judge.requests == 6 and not judge.slept


def test_position_bias_is_a_tie(server):
  server.respond = lambda body, n: (200, {}, _chat("[[A]]"))
  judge = _judge(server.url)
  assert judge.compare("Q?", "a good answer", "a poor answer") == "tie"
  assert judge.judge_pair("Q?", "x", "y") == ("tie", "A", "A")


def test_429_and_500_are_retried(server):
  def flaky(body, n):
    if n == 1:
      return 429, {"Retry-After": "7"}, {"error": "rate limited"}
    if n == 2:
      return 500, {}, {"error": "overloaded"}
    return prefers_good(body, n)
  server.respond = flaky
  judge = _judge(server.url)
  assert judge.verdict("Q?", "a good answer", "meh") == "A"
  assert judge.requests == 3 == len(server.log)
  assert judge.slept == [7.0, 0.02]  # Retry-After honoured, then backoff * 2


def test_timeout_is_retried(server):
  def slow_once(body, n):
    if n == 1:
      time.sleep(2.5)
    return prefers_good(body, n)
  server.respond = slow_once
  judge = _judge(server.url, timeout=1.0)  # ample for a loaded machine
  assert judge.verdict("Q?", "meh", "a good answer") == "B"
  assert judge.requests == 2 and judge.slept == [0.01]


@pytest.mark.parametrize("payload", [_chat("Both are fine, I cannot say."),
                                     b"<html>bad gateway page</html>"])
def test_malformed_verdict_raises_after_retries(server, payload):
  server.respond = lambda body, n: (200, {}, payload)
  judge = _judge(server.url)
  with pytest.raises(JudgeError, match="no usable verdict in 3 attempts") as e:
    judge.verdict("Q?", "x", "y")
  assert server.url in str(e.value) and judge.requests == 3


def test_connection_refused_names_the_url(tmp_path):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/v1"
  judge = _judge(url, cache_dir=str(tmp_path))
  with pytest.raises(JudgeConnectionError) as e:
    judge.compare("Q?", "x", "y")
  message = str(e.value)
  assert f"{url}/chat/completions" in message and "3 attempts" in message
  assert "server is running" in message and "Connection refused" in message
  assert judge.slept == [0.01, 0.02]


def test_cached_pair_is_not_asked_again(server, tmp_path):
  cache = tmp_path / "cache"
  judge = _judge(server.url, cache_dir=str(cache))
  assert judge.compare("Q?", "a good answer", "meh") == "a"
  assert judge.compare("Q?", "a good answer", "meh") == "a"
  assert len(server.log) == 2 and judge.cache_hits == 2
  assert len(list(cache.iterdir())) == 2  # one file per order, no temp files
  # A killed run's temp file (a pid that cannot exist) is swept; a new judge
  # (a re-run) answers from the cache alone.
  stale = cache / temp_prefix("x.json").replace(f"-{os.getpid()}@", "-4194305@")
  stale.write_text("{")
  again = _judge(server.url, cache_dir=str(cache))
  assert not stale.exists()
  assert again.compare("Q?", "meh", "a good answer") == "b"
  assert again.requests == 0 and len(server.log) == 2
  # Another judge model is another key.
  other = PairwiseJudge(server.url, "other-model", cache_dir=str(cache))
  other.verdict("Q?", "a good answer", "meh")
  assert other.requests == 1


def test_interrupted_run_keeps_its_verdicts(server, tmp_path):
  rows = [{"prompt_id": i, "seed": 0, "mode": mode, "prompt": f"P{i}",
           "text": f"{mode} text {i}" + (" good" if mode == "dynamo" else "")}
          for i in range(4) for mode in ("ar", "dynamo")]
  base = judging.baselines(rows)
  # The server answers four requests (two pairs), then hangs up on every one.
  server.respond = lambda body, n: prefers_good(body, n) if n <= 4 else None
  judge = _judge(server.url, cache_dir=str(tmp_path))
  with pytest.raises(JudgeConnectionError, match="kept in"):
    judging.judge_outcomes(rows, base, judge, workers=1)
  assert len(os.listdir(tmp_path)) == 4
  server.respond = prefers_good
  rerun = _judge(server.url, cache_dir=str(tmp_path))
  got = judging.judge_outcomes(rows, base, rerun, workers=2)
  assert rerun.requests == 4 and rerun.cache_hits == 4
  assert [g and g["outcome"] for g in got] == [None, "win"] * 4


def test_key_sent_but_never_written(server, tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(KEY_ENV, KEY)
  caplog.set_level(logging.DEBUG)
  judge = _judge(server.url, cache_dir=str(tmp_path))
  judge.compare("Q?", "a good answer", "meh")
  assert {e["auth"] for e in server.log} == {f"Bearer {KEY}"}
  assert KEY not in repr(judge) and "(set)" in repr(judge)
  # A server that echoes the key in its refusal: quoted redacted.
  server.respond = lambda body, n: (401, {}, {"error": f"bad key {KEY}"})
  with pytest.raises(JudgeError, match="HTTP 401") as e:
    judge.verdict("Q?", "other", "texts")
  assert KEY not in str(e.value) and KEY_ENV in str(e.value)
  assert KEY not in caplog.text
  _assert_no_key(tmp_path)
  monkeypatch.delenv(KEY_ENV)
  server.respond = prefers_good
  _judge(server.url).verdict("Q?", "new", "pair")
  assert server.log[-1]["auth"] is None  # unset: no header


def _assert_no_key(root):
  for dirpath, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as fh:
        assert KEY.encode() not in fh.read(), os.path.join(dirpath, name)


# ---- statistics against brute force ------------------------------------------

def _table(rng, groups=((0.0, 2.6), (0.3, 2.0), (0.6, 1.5), (1.0, 1.05)),
           n=6, p_win=(0.2, 0.35, 0.45, 0.5)):
  """Hand-made rows: n AR rows, then n dynamo rows per (eps_b, speed)."""
  rows, scores, outcomes = [], [], []
  for i in range(n):
    rows.append({"prompt_id": i, "seed": 0, "mode": "ar", "eps_b": None,
                 "tokens_per_pass": 1.0, "forward_passes": 20 + i,
                 "seconds": 1.0 + 0.1 * i, "token_ids": [1] * (20 + i)})
    scores.append({"nll_sum": 3.0 * (20 + i), "nll_tokens": 20 + i})
    outcomes.append(None)
  for (eps, speed), p in zip(groups, p_win):
    for i in range(n):
      passes = int(20 / speed) + int(rng.integers(0, 3))
      rows.append({"prompt_id": i, "seed": 0, "mode": "dynamo", "eps_b": eps,
                   "tokens_per_pass": 20 / passes, "forward_passes": passes,
                   "seconds": (1.0 + 0.1 * i) / speed * rng.uniform(0.8, 1.2),
                   "token_ids": [1] * 20})
      scores.append({"nll_sum": 20 * (3.0 + (speed - 1) * rng.uniform(0, .5)),
                     "nll_tokens": 20})
      u = rng.uniform()
      outcomes.append({"outcome": "win" if u < p else "tie" if u < 2 * p
                       else "loss"})
  for s in scores:
    s.update(distinct_1=0.5, distinct_2=0.7, distinct_3=0.9, repetition=0.1)
  return rows, judging.baselines(rows), scores, outcomes


def _brute_force(rows, scores, outcomes, axis):
  """Per dynamo group (eps_b ->) speed-ups and quality, from plain loops."""
  ar = {r["prompt_id"]: k for k, r in enumerate(rows) if r["mode"] == "ar"}
  out = {}
  for eps in sorted({r["eps_b"] for r in rows if r["mode"] == "dynamo"}):
    idx = [k for k, r in enumerate(rows) if r["eps_b"] == eps
           and r["mode"] == "dynamo"]
    base = [ar[rows[k]["prompt_id"]] for k in idx]
    got = [outcomes[k]["outcome"] if outcomes[k] else None for k in idx]
    wins, losses, ties = (got.count(x) for x in ("win", "loss", "tie"))
    toks = sum(rows[k]["tokens_per_pass"] * rows[k]["forward_passes"]
               for k in idx)
    passes = sum(rows[k]["forward_passes"] for k in idx)
    ar_tpp = (sum(rows[k]["forward_passes"] for k in base)
              / sum(rows[k]["forward_passes"] for k in base))
    nll = sum(scores[k]["nll_sum"] for k in idx) / sum(
        scores[k]["nll_tokens"] for k in idx)
    ar_nll = sum(scores[k]["nll_sum"] for k in base) / sum(
        scores[k]["nll_tokens"] for k in base)
    out[eps] = {
        "speedup_tokens_per_pass": toks / passes / ar_tpp,
        "speedup_wall_clock": sum(rows[k]["seconds"] for k in base)
                              / sum(rows[k]["seconds"] for k in idx),
        "win_rate": wins / losses if losses else None,
        "win_score": (wins + ties / 2) / len(idx), "nll_ratio": ar_nll / nll,
        "wins": wins, "losses": losses, "ties": ties}
  crossings = {}
  for field in ("speedup_tokens_per_pass", "speedup_wall_clock"):
    pts = [(g[field], g[axis]) for g in out.values() if g[axis] is not None]
    x, y = np.asarray(pts).T
    (slope, intercept), *_ = np.linalg.lstsq(
        np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    crossings[field] = (1.0 - intercept) / slope
  return out, crossings


@pytest.mark.parametrize("judged", [True, False])
def test_win_rates_and_crossing_against_brute_force(judged):
  rows, base, scores, outcomes = _table(np.random.default_rng(3))
  # One group with no loss: win rate undefined, left out of the regression.
  for k, r in enumerate(rows):
    if r.get("eps_b") == 1.0:
      outcomes[k] = {"outcome": "win" if k % 2 else "tie"}
  if not judged:
    outcomes = [None] * len(rows)
  axis = "win_rate" if judged else "nll_ratio"
  summary = judging.summarize(rows, base, scores, outcomes, bootstrap=0)
  assert summary["quality_axis"] == axis
  expected, crossings = _brute_force(rows, scores, outcomes, axis)
  groups = summary["groups"]
  assert groups[0]["mode"] == "ar" and groups[0]["wins"] is None
  assert groups[0]["speedup_wall_clock"] == pytest.approx(1.0)
  for g in groups[1:]:
    want = expected[g["eps_b"]]
    for key, value in want.items():
      if not judged and key in ("wins", "losses", "ties", "win_rate",
                                "win_score"):
        assert g[key] is None
      elif value is None:
        assert g[key] is None
      else:
        assert g[key] == pytest.approx(value, rel=1e-12), key
  if judged:
    assert expected[1.0]["win_rate"] is None
  got = summary["same_quality_speedup"]["dynamo"]
  assert got["tokens_per_pass"]["point"] == pytest.approx(
      crossings["speedup_tokens_per_pass"], rel=1e-9)
  assert got["wall_clock"]["point"] == pytest.approx(
      crossings["speedup_wall_clock"], rel=1e-9)


def test_bootstrap_interval_is_seeded_and_contains_the_point():
  rows, base, scores, outcomes = _table(
      np.random.default_rng(0), n=40,
      groups=((0.0, 3.0), (0.2, 2.4), (0.4, 1.9), (0.6, 1.5), (0.8, 1.2)),
      p_win=(0.15, 0.25, 0.32, 0.4, 0.45))
  one = judging.summarize(rows, base, scores, outcomes, bootstrap=300, seed=5)
  two = judging.summarize(rows, base, scores, outcomes, bootstrap=300, seed=5)
  other = judging.summarize(rows, base, scores, outcomes, bootstrap=300, seed=6)
  assert one == two
  for name, c in one["same_quality_speedup"]["dynamo"].items():
    lo, hi = c["interval"]
    assert lo < c["point"] < hi and c["defined"] >= 290, (name, c)
    assert c["interval"] != other["same_quality_speedup"]["dynamo"][name][
        "interval"]


def test_crossing_degenerate_cases():
  assert judging.crossing([1.0, 1.0], [0.5, 0.7]) is None  # one distinct x
  assert judging.crossing([1.0, 2.0], [0.5, 0.5]) is None  # flat
  assert judging.crossing([1.0, 2.0, 3.0], [2.0, 1.5, float("nan")]) == 3.0


# ---- offline scores ------------------------------------------------------------

def _repetition_brute_force(toks, n=4):
  """Token t counts when some 4-gram holding it occurred earlier."""
  if not toks:
    return float("nan")
  hit = 0
  for t in range(len(toks)):
    hit += any(toks[i:i + n] == toks[j:j + n]
               for i in range(max(0, t - n + 1), min(t, len(toks) - n) + 1)
               for j in range(i))
  return hit / len(toks)


def test_repetition_and_distinct_by_hand():
  assert judging.repetition_rate([1, 2, 3, 4, 1, 2, 3, 4, 5]) == 4 / 9
  assert judging.repetition_rate([5] * 6) == 5 / 6
  assert judging.repetition_rate([1, 2, 3]) == 0.0
  assert math.isnan(judging.repetition_rate([]))
  rng = np.random.default_rng(0)
  for _ in range(50):
    toks = rng.integers(0, 3, size=rng.integers(0, 14)).tolist()
    got, want = judging.repetition_rate(toks), _repetition_brute_force(toks)
    assert got == want or (math.isnan(got) and math.isnan(want))
  rows = [{"token_ids": [7, 7, 8, 7, 8]}]
  score, = judging.offline_scores(rows, [np.asarray([1.0, 2.0, 3.0, 4.0, 5.0])])
  # 1-grams: 7 7 8 7 8 -> {7, 8}; 2-grams 77 78 87 78 -> 3; 3-grams 778 787 878
  assert (score["distinct_1"], score["distinct_2"], score["distinct_3"]) == (
      2 / 5, 3 / 4, 3 / 3)
  assert score["nll"] == 3.0 and score["nll_tokens"] == 5


@pytest.fixture(scope="module")
def loaded():
  """The embedded model, loaded once for the module (load is patched to a
  cached copy so the CLI runs below reuse it)."""
  from dynamo_jax.default_model import default_model_dir
  cached = functools.lru_cache(maxsize=1)(api.load)

  def load(path_or_id=None):  # the embedded model by its directory too
    return cached(None if path_or_id == default_model_dir() else path_or_id)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(api, "load", load)
    yield load(None)


def _generations(tmp_path, model):
  """A small generations.jsonl: 2 prompts x 2 seeds, AR, DynaMo at three
  eps_b (at 1.0 the text is AR's) and verified. Texts are written, not
  sampled; ids are the tokenizer's encoding of them."""
  texts = {"ar": "the house and the garden were quiet",
           0.0: "a good day the good day the good day",
           0.5: "the garden was good and green",
           1.0: None, "verified": "the house was quiet and dark"}
  speed = {"ar": 1.0, 0.0: 2.5, 0.5: 1.8, 1.0: 1.0, "verified": 1.4}
  rows = []
  for pid, prompt in enumerate(["I am a student at the", "Please explain"]):
    for seed in (0, 1):
      for key, text in texts.items():
        text = (text or texts["ar"]) + (" again" * seed)
        ids = model.tokenizer.encode(text)
        mode = key if isinstance(key, str) else "dynamo"
        passes = max(1, round(len(ids) / speed[key]))
        rows.append({"prompt_id": pid, "prompt": prompt, "seed": seed,
                     "mode": mode, "eps_b": None if isinstance(key, str)
                     else key, "text": text,
                     "prompt_ids": model.tokenizer.encode(prompt),
                     "token_ids": ids, "forward_passes": passes,
                     "tokens_per_pass": len(ids) / passes,
                     "seconds": 0.5 / speed[key] + 0.01 * seed, "model": None})
  gen = tmp_path / "gen"
  gen.mkdir()
  with open(gen / judging.GENERATIONS_FILE, "w") as fh:
    fh.writelines(json.dumps(r) + "\n" for r in rows)
  return gen, rows


def _direct_nll(config, params, prompt, cont):
  logits = np.asarray(dynamo_jax.forward(config, params, np.asarray(
      [prompt + cont], np.int32))[0], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  p = len(prompt)
  return -logp[np.arange(p - 1, p + len(cont) - 1), cont]


def test_reference_nll_against_forward(loaded, tmp_path):
  _, rows = _generations(tmp_path, loaded)
  # All rows (the CLI test below compiles the same shapes): two prompt
  # lengths, continuations of several lengths padded within a batch, the
  # last batch padded with repeated rows.
  own = judging.reference_nll(rows)
  # The brute-force forward compiles once per length: check the rows of the
  # two most common lengths.
  lengths = collections.Counter(len(r["prompt_ids"]) + len(r["token_ids"])
                                for r in rows)
  common = [t for t, _ in lengths.most_common(2)]
  checked = [k for k, r in enumerate(rows)
             if len(r["prompt_ids"]) + len(r["token_ids"]) in common]
  assert len({len(rows[k]["prompt_ids"]) for k in checked}) == 2
  for k in checked:
    want = _direct_nll(loaded.config, loaded.params, rows[k]["prompt_ids"],
                       rows[k]["token_ids"])
    np.testing.assert_allclose(own[k], want, atol=1e-4, rtol=0)
  # --reference re-encodes prompt and text with the reference's tokenizer:
  # the same ids here, so the same NLLs.
  from dynamo_jax.default_model import default_model_dir
  ref = judging.reference_nll(rows, reference=default_model_dir())
  for a, b in zip(own, ref):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _run(argv):
  parser = argparse.ArgumentParser()
  judge_lib.add_parser(parser.add_subparsers())
  args = parser.parse_args(["judge", *argv])
  return args.func(args)


def test_cli_end_to_end(loaded, server, tmp_path, monkeypatch, capsys, caplog):
  monkeypatch.setenv(KEY_ENV, KEY)
  caplog.set_level(logging.DEBUG)
  gen, rows = _generations(tmp_path, loaded)
  argv = ["--generations", str(gen), "--judge-url", server.url,
          "--judge-model", "judge-model", "--api-key-env", KEY_ENV,
          "--bootstrap", "20", "--workers", "2"]
  summary = _run(argv + ["--json"])
  assert json.loads(capsys.readouterr().out) == summary
  out = gen / "judge"
  assert sorted(os.listdir(out)) == ["quality_vs_speedup.png", "scores.jsonl",
                                     "summary.json", "summary.md"]
  assert json.loads((out / "summary.json").read_text()) == summary
  scores = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
  assert len(scores) == len(rows)
  asked = [s for s in scores if s["verdicts"]]
  # Every non-AR row differing from its AR text is asked in both orders.
  assert len(server.log) == 2 * len(asked) == 2 * sum(
      r["mode"] != "ar" and r.get("eps_b") != 1.0 for r in rows)
  by_key = {(g["mode"], g["eps_b"]): g for g in summary["groups"]}
  assert by_key[("dynamo", 0.0)]["wins"] == 4  # "good" wins with this judge
  assert by_key[("dynamo", 1.0)]["ties"] == 4  # AR's own text: tied unasked
  assert by_key[("verified", None)]["ties"] == 4
  assert summary["quality_axis"] == "win_rate"
  assert (out / "quality_vs_speedup.png").read_bytes()[:4] == b"\x89PNG"
  # A re-run asks nothing (verdicts cached) and replaces the outputs.
  asked_before = len(server.log)
  again = _run(argv)
  assert len(server.log) == asked_before and again["judge"]["requests"] == 0
  assert "| dynamo | 0.00 |" in capsys.readouterr().out
  # Without a judge: the offline axis, said so.
  offline = _run(["--generations", str(gen), "--out", str(tmp_path / "off"),
                  "--bootstrap", "20"])
  assert offline["quality_axis"] == "nll_ratio"
  assert "no judge configured" in (tmp_path / "off" / "summary.md").read_text()
  captured = capsys.readouterr()
  for text in (captured.out, captured.err, caplog.text):
    assert KEY not in text
  _assert_no_key(tmp_path)
  assert {e["auth"] for e in server.log} == {f"Bearer {KEY}"}


def test_missing_baseline_and_bad_lines(tmp_path):
  path = tmp_path / judging.GENERATIONS_FILE
  path.write_text('{"prompt_id": 0}\n')
  with pytest.raises(judging.DynamoError, match=":1: missing or invalid"):
    judging.read_generations(str(path))
  rows = [{"prompt_id": 0, "seed": 1, "mode": "dynamo"}]
  with pytest.raises(judging.DynamoError, match="no AR row"):
    judging.baselines(rows)
  with pytest.raises(judge_lib.DynamoError, match="together"):
    _run(["--generations", str(tmp_path), "--judge-url", "http://x/v1"])
  with pytest.raises(JudgeError, match="not an http"):
    PairwiseJudge("127.0.0.1:8000/v1", "m")

