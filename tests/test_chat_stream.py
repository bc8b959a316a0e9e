"""The streaming API (chat/stream.py) against `generate`, and the chat
command driven in a pseudo-terminal as a user would drive it."""

from __future__ import annotations

import dataclasses
import os
import re
import select
import subprocess
import sys
import time

import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.chat.stream import stream
from dynamo_jax.chat.template import chat_template, render
from dynamo_jax.errors import InputError
from tests.conftest import ROOT

PROMPT = "ROMEO: What light through yonder window"


@pytest.fixture(scope="module")
def model():
  return dynamo_jax.load()


def _generated(model, mode, greedy, seed, max_new, **kw):
  ids = model.tokenizer.encode(PROMPT)
  out = dynamo_jax.generate(model.config, model.params, np.array([ids]),
                            mode=mode, max_new_tokens=max_new, greedy=greedy,
                            seed=seed, **kw)
  return ids, out.tokens[0].tolist()


# (mode, greedy, options); "cooc" stands for the model's own table.
# Each case compiles two programs (generate's, stream's): seconds on CPU,
# so sampled and greedy are spread over the modes rather than crossed.
CASES = [("ar", False, {}), ("ar", True, {}),
         ("dynamo", False, {"cooc": "cooc"}), ("dynamo", True, {}),
         ("verified", True, {}), ("verified", False, {"tree": 3})]


@pytest.mark.parametrize("mode,greedy,options", CASES,
                         ids=[f"{m}-{'greedy' if g else 'sampled'}-"
                              f"{'-'.join(o) or 'plain'}" for m, g, o in CASES])
def test_stream_equals_generate(model, mode, greedy, options):
  kw = {k: (model.cooc if v == "cooc" else v) for k, v in options.items()}
  ids, tokens = _generated(model, mode, greedy, 3, 20, **kw)
  chunks = list(stream(model, ids, mode=mode, max_new_tokens=20,
                       greedy=greedy, seed=3, stop_at_eos=False, **kw))
  assert [t for c in chunks for t in c.token_ids] == tokens
  assert "".join(c.text for c in chunks) == model.tokenizer.decode(tokens)
  assert [c.passes for c in chunks] == list(range(1, len(chunks) + 1))
  assert [c.finished for c in chunks] == [None] * (len(chunks) - 1) + [
      "length"]
  n = 1 if mode == "ar" else model.config.num_token_heads
  assert all(1 <= len(c.token_ids) <= n for c in chunks)
  if mode == "dynamo" and not greedy:  # the trained heads: multi-token passes
    assert max(len(c.token_ids) for c in chunks) > 1
    assert chunks[-1].tokens_per_pass > 1
  # The same text given as text: the same tokens.
  again = list(stream(model, PROMPT, mode=mode, max_new_tokens=20,
                      greedy=greedy, seed=3, stop_at_eos=False, **kw))
  assert [c.token_ids for c in again] == [c.token_ids for c in chunks]


@dataclasses.dataclass
class _Tokenizer:
  """The model's tokenizer with another EOS id, or another text."""
  inner: object
  eos_token_id: int
  text: bytes | None = None  # decode(ids) = text's first len(ids) bytes

  def encode(self, text):
    return self.inner.encode(text)

  def decode(self, ids):
    if self.text is None:
      return self.inner.decode(ids)
    return self.text[:len(ids)].decode("utf-8", errors="replace")


def test_stops_at_eos_as_generate_cut_there(model):
  # The settings of a test_stream_equals_generate case: compiled already.
  ids, tokens = _generated(model, "dynamo", False, 3, 20, cooc=model.cooc)
  eos = tokens[7]  # an id the answer emits: pretend it is the EOS
  cut = tokens[:tokens.index(eos)]
  fake = dataclasses.replace(model, tokenizer=_Tokenizer(model.tokenizer, eos))
  chunks = list(stream(fake, ids, mode="dynamo", max_new_tokens=20, seed=3,
                       cooc=model.cooc))
  assert [t for c in chunks for t in c.token_ids] == cut
  assert chunks[-1].finished == "eos" and chunks[-1].tokens == len(cut)
  assert "".join(c.text for c in chunks) == model.tokenizer.decode(cut)


def test_split_characters_are_held_back(model):
  """Text whose characters span several tokens: no chunk shows half a
  character (U+FFFD), and the chunks join to the whole decoded text."""
  text = "café 日本語 ünïcödé ♥ ".encode("utf-8") * 3
  fake = dataclasses.replace(model, tokenizer=_Tokenizer(model.tokenizer, 0,
                                                         text))
  chunks = list(stream(fake, model.tokenizer.encode(PROMPT), mode="dynamo",
                       max_new_tokens=20, seed=3, cooc=model.cooc,
                       stop_at_eos=False))
  joined = "".join(c.text for c in chunks)
  assert joined == text[:20].decode("utf-8", errors="replace")
  assert "\ufffd" not in "".join(c.text for c in chunks[:-1])
  assert any(len(c.token_ids) > len(c.text.encode()) for c in chunks[:-1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="beam"), "mode 'beam' unknown"),
    (dict(eps_b=2.0), r"eps_b must lie in \[0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[[1, 2], [3, 4]]), "one sequence of token ids"),
    (dict(prompt=np.zeros((2, 3), np.int32)), "got shape"),
    (dict(stop_at_eos="yes"), "stop_at_eos must be True or False"),
    (dict(mode="ar", cooc="cooc"), "mode 'ar' without a tree does not use it"),
])
def test_bad_arguments_are_refused_before_decoding(model, kwargs, match):
  kwargs = {k: (model.cooc if isinstance(v, str) and v == "cooc" else v)
            for k, v in kwargs.items()}
  prompt = kwargs.pop("prompt", PROMPT)
  with pytest.raises(InputError, match=match):
    stream(model, prompt, **kwargs)


# --- the chat command in a pseudo-terminal ---

STATS = re.compile(r"\r\n\[(\d+) tokens in (\d+) passes: ([\d.]+) tokens/pass,"
                   r" ([\d.]+) tokens/s, ended by (eos|length)"
                   r"(; compiled in [\d.]+ s)?\]\r\n> $")


class _Terminal:
  """`python -m dynamo_jax ...` on a pseudo-terminal that is its controlling
  terminal (setsid --ctty: Ctrl-C typed there is SIGINT to it), started
  without forking this multithreaded process."""

  def __init__(self, argv):
    self.fd, child = os.openpty()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    self.proc = subprocess.Popen(
        ["setsid", "--ctty", "--wait", sys.executable, "-m", "dynamo_jax",
         *argv],
        stdin=child, stdout=child, stderr=child, env=env, cwd=ROOT)
    os.close(child)
    self.seen = b""

  def read_until(self, pattern, timeout=240) -> str:
    """All output from now until `pattern` (a regex) matches its end."""
    start, deadline = len(self.seen), time.monotonic() + timeout
    while not re.search(pattern, self.seen[start:].decode("utf-8", "replace")):
      ready, _, _ = select.select([self.fd], [], [], 1.0)
      if ready:
        try:
          data = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
          data = b""
        if not data:
          raise AssertionError(f"chat ended early: {self.seen!r}")
        self.seen += data
      assert time.monotonic() < deadline, f"no {pattern!r} in {self.seen!r}"
    return self.seen[start:].decode("utf-8", "replace")

  def type(self, text: str):
    os.write(self.fd, text.encode())

  def exit_code(self, timeout=180) -> int:
    deadline = time.monotonic() + timeout
    while self.proc.poll() is None:
      try:  # drain, so the child never blocks on a full terminal
        if select.select([self.fd], [], [], 0.2)[0]:
          self.seen += os.read(self.fd, 4096)
      except OSError:
        pass
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f"chat did not exit: {self.seen!r}")
    try:  # what it wrote last
      while select.select([self.fd], [], [], 0.2)[0]:
        data = os.read(self.fd, 4096)
        if not data:
          break
        self.seen += data
    except OSError:
      pass
    os.close(self.fd)
    return self.proc.returncode


def _answer_of(output: str, question: str) -> tuple[str, re.Match]:
  """The streamed answer between the echoed question and the stats line."""
  stats = STATS.search(output)
  assert stats, output
  body = output[:stats.start()]
  body = body[body.index(question + "\r\n") + len(question) + 2:]
  return body.replace("\r\n", "\n"), stats


def test_chat_in_a_terminal(model):
  argv = ["chat", "--max-new-tokens", "16", "--seed", "3"]
  term = _Terminal(argv)
  opening = term.read_until(r"> $")
  assert "note: the tokenizer has no chat template" in opening
  template, _ = chat_template(model.tokenizer)
  messages = []
  for question in ("Who art thou?", "And whither goest thou now?"):
    term.type(question + "\n")
    # The streamed API on the same conversation, while the chat compiles.
    messages.append({"role": "user", "content": question})
    ids = model.tokenizer.encode(render(model.tokenizer, messages,
                                        add_generation_prompt=True,
                                        template=template))
    chunks = list(stream(model, ids, mode="dynamo", max_new_tokens=16,
                         seed=3, cooc=model.cooc))
    expected = "".join(c.text for c in chunks)
    shown, stats = _answer_of(term.read_until(STATS.pattern), question)
    assert shown == expected
    tokens, passes = int(stats.group(1)), int(stats.group(2))
    assert (tokens, passes) == (chunks[-1].tokens, chunks[-1].passes)
    # Multi-token passes: fewer passes than tokens, several chunks.
    assert 1 < passes < tokens and len(chunks) == passes
    messages.append({"role": "assistant", "content": expected})
  term.type("/quit\n")
  assert term.exit_code() == 0, term.seen


@pytest.mark.parametrize("key,code,last", [("\x04", 0, r"> \r\n$"),
                                           ("\x03", 130, r"interrupted: chat")])
def test_chat_ctrl_c_and_eof(key, code, last):
  """Ctrl-C during an answer stops it and returns to the prompt; there,
  EOF (Ctrl-D) ends the chat with exit 0, Ctrl-C with 130."""
  term = _Terminal(["chat", "--mode", "ar", "--max-new-tokens", "8"])
  term.read_until(r"> $")
  term.type("Speak.\n")
  time.sleep(1.0)  # the chat has read the question: it is compiling
  term.type("\x03")
  term.read_until(r"\[answer stopped: Ctrl-C\]\r\n> $")
  term.type(key)
  assert term.exit_code() == code, term.seen
  assert re.search(last, term.seen.decode()), term.seen
  assert b"Traceback" not in term.seen
