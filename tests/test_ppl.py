"""`eval ppl`: PPL_d against a brute-force computation, the data files it
reads, and the command as a user runs it.

The PPL_d reference runs one forward pass per position over the document's
prefix, decides each position's order with the brute-force numpy sampler
(tests/sampler_reference.py), walks the document in numpy and sums the
log-softmax NLLs in float64: no windows, batching, padding or jit shared
with the code under test.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.errors import InputError
from dynamo_jax.evaluation import perplexity, ppl
from tests import sampler_reference
from tests.test_dynamo_sampler import COOC, TABLES, V

EOS = 0
K = 5
# float32 logits against the float64 reference: NLL sums differ by rounding.
PPL_RTOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
  config = dynamo_jax.PythiaConfig(vocab_size=V, hidden_size=24, num_layers=2,
                                   num_heads=3, intermediate_size=97,
                                   max_position_embeddings=64,
                                   num_token_heads=3, bos_token_id=EOS,
                                   eos_token_id=EOS)
  params = dynamo_jax.init_params(config, jax.random.PRNGKey(3))
  # Larger than the 0.02 init: sharp and flat heads, so every order occurs.
  params = jax.tree.map(lambda p: p * 10.0 if p.ndim == 2 else p, params)
  return config, params


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [np.append(rng.integers(1, V, size=n - 1), EOS) for n in lengths]


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reference(config, params, docs, eps_b, tables):
  total, tokens, tuples, orders = 0.0, 0, 0, []
  for doc in docs:
    size = doc.size - 1
    m_at, nll_at = [], []
    for t in range(size):
      logits = np.asarray(dynamo_jax.forward(config, params, doc[None, :t + 1],
                                             all_heads=True), np.float64)
      last = logits[:, 0, -1, :]  # [N, V]
      m, _, _ = sampler_reference.reference_sample(
          last[None], doc[None, :t + 1], np.array([t + 1]), tables, n=3, k=K,
          temperature=0.7, eps_b=eps_b, greedy=True, u_B=np.array([0.5]),
          ar_token_B=np.array([0]))
      m_at.append(int(m[0]))
      logp = _log_softmax(last)
      nll_at.append([-logp[i, doc[t + 1 + i]] if t + 1 + i < doc.size
                     else np.nan for i in range(3)])
    orders += m_at
    t = 0
    while t < size:
      m = min(m_at[t], size - t)
      total += sum(nll_at[t][:m])
      tokens += m
      tuples += 1
      t += m
  return math.exp(total / tokens), tokens / tuples, orders


# Orders seen along these walks: eps_b 0.2 without a table 1, 2, 3; 0.4
# with the table 1, 2, 3 (checked below).
@pytest.mark.parametrize("eps_b,with_table", [(0.0, False), (0.2, False),
                                               (0.4, True)])
def test_ppl_d_matches_brute_force(eps_b, with_table):
  config, params = _model()
  docs = _docs([13, 4, 9])
  stream = np.concatenate(docs)
  tables = TABLES if with_table else None
  want_ppl, want_tpp, orders = _reference(config, params, docs, eps_b, tables)
  got = perplexity.evaluate_dynamic(
      config, params, stream, eos_id=EOS, eps_b=eps_b,
      cooc=COOC if with_table else None, k=K, window=16)
  np.testing.assert_allclose(got["ppl_d"], want_ppl, rtol=PPL_RTOL)
  assert got["tokens_per_pass_d"] == pytest.approx(want_tpp, rel=1e-12)
  if eps_b > 0:  # the walk is not trivial: every order occurs
    assert set(orders) == {1, 2, 3}, orders


def test_ppl_d_at_eps_b_1_is_ppl_1():
  config, params = _model()
  stream = np.concatenate(_docs([20, 7, 12], seed=1))
  got = perplexity.evaluate_dynamic(config, params, stream, eos_id=EOS,
                                    eps_b=1.0, k=K, window=8, stride=3)
  assert got["tokens_per_pass_d"] == 1.0
  assert got["ppl_d"] == pytest.approx(got["ppl_1"], rel=1e-12)
  assert got["tokens_scored"] == 19 + 6 + 11 and got["documents"] == 3
  # The other keys are evaluate()'s (tested against brute force elsewhere).
  plain = perplexity.evaluate(config, params, stream, eos_id=EOS, window=8,
                              stride=3)
  for key in ("ppl_1", "ppl_2", "ppl_3", "ppl_1:2", "ppl_1:3"):
    assert got[key] == plain[key]


def test_walk_by_hand():
  nll = np.array([[1.0, 2.0, 3.0, 4.0, 5.0],
                  [10.0, 20.0, 30.0, 40.0, np.nan],
                  [100.0, 200.0, 300.0, np.nan, np.nan]])
  # One document of 5 positions; orders 3 at t=0 and 2 at t=3 (capped by
  # nothing), then the end: tuples (x1..x3), (x4, x5).
  got = perplexity.dynamic_perplexity(nll, np.array([3, 1, 1, 2, 1]), [5])
  assert got["tokens_per_pass_d"] == 2.5
  assert got["ppl_d"] == pytest.approx(math.exp((1 + 10 + 100 + 4 + 40) / 5))
  # The cap: order 3 at the last position scores one token.
  got = perplexity.dynamic_perplexity(nll, np.array([1, 1, 1, 1, 3]), [5])
  assert got["ppl_d"] == pytest.approx(math.exp(15 / 5))


class _Tok:
  """Characters as token ids 1..V-1 (a stand-in with encode/decode)."""

  def encode(self, text):
    return [1 + ord(c) % (V - 1) for c in text]


def test_read_stream_formats(tmp_path):
  tok = _Tok()
  (tmp_path / "a.txt").write_text("abc\ndef")
  stream = ppl.read_stream(str(tmp_path / "a.txt"), tok, eos_id=EOS,
                           vocab_size=V)
  np.testing.assert_array_equal(stream, tok.encode("abc\ndef") + [EOS])
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"body": "ab"}) + "\n\n" + json.dumps({"body": "c"}) + "\n")
  stream = ppl.read_stream(str(tmp_path / "b.jsonl"), tok, eos_id=EOS,
                           vocab_size=V, field="body")
  np.testing.assert_array_equal(stream, tok.encode("ab") + [EOS] +
                                tok.encode("c") + [EOS])
  np.save(tmp_path / "c.npy", np.array([3, 4, EOS, 5, 6]))
  stream = ppl.read_stream(str(tmp_path / "c.npy"), tok, eos_id=EOS,
                           vocab_size=V)
  np.testing.assert_array_equal(stream, [3, 4, EOS, 5, 6, EOS])


@pytest.mark.parametrize("name,content,match", [
    ("e.txt", b"", "has no text to score"),
    ("e.jsonl", b"", "has no text to score"),
    ("f.jsonl", b'{"text": 1}\n', "line 1 has no text field 'text'"),
    ("g.jsonl", b"{oops\n", "line 1 is not valid JSON"),
    ("h.txt", b"\xff\xfe", "is not UTF-8"),
    ("v.npy", None, "outside this model's vocabulary of 11"),
    ("x.csv", b"a", "unknown data file type"),
])
def test_read_stream_refuses(tmp_path, name, content, match):
  path = tmp_path / name
  if content is None:
    np.save(path, np.array([1, 2, 50]))
  else:
    path.write_bytes(content)
  with pytest.raises(InputError, match=match):
    ppl.read_stream(str(path), _Tok(), eos_id=EOS, vocab_size=V)


def test_cli_json_on_the_embedded_model(tmp_path):
  """As a user runs it: one JSON object with the documented keys; eps_b 1
  gives PPL_d = PPL_1."""
  text = tmp_path / "docs.jsonl"
  text.write_text("\n".join(json.dumps({"text": t}) for t in (
      "And the LORD spake unto Moses, saying,",
      "To be, or not to be: that is the question.")))
  proc = subprocess.run(
      [sys.executable, "-m", "dynamo_jax", "eval", "ppl", "--data", str(text),
       "--eps-b", "1", "--json"], capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  assert set(got) == {"ppl_1", "ppl_2", "ppl_3", "ppl_1:2", "ppl_1:3",
                      "ppl_d", "tokens_per_pass_d", "eps_b", "tokens_scored",
                      "documents", "window"}
  assert got["ppl_d"] == pytest.approx(got["ppl_1"], rel=1e-12)
  assert got["documents"] == 2 and got["eps_b"] == 1.0
