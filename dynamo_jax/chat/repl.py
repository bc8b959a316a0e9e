"""`python -m dynamo_jax chat`: a terminal chat, streamed pass by pass.

The conversation is kept as messages and rendered with the chat template
(`chat.template`: the tokenizer's own, else the project default with a
one-line note on stderr) before every answer; the answer is streamed with
`chat.stream.stream`, printed chunk by chunk as each forward pass emits it
(with DynaMo a chunk holds 1..n tokens), and ends at the tokenizer's EOS or
after --max-new-tokens. Every answer is decoded with --seed, so a
conversation replays exactly. A stats line (stderr) follows each answer.

Decided here:
- Long conversations: when the rendered prompt is longer than the model
  allows (max_position_embeddings minus max_new_tokens minus the heads'
  look-ahead: `generate.max_prompt_length`), the oldest turns (a question
  and its answer; a system message is kept) are dropped, with one line on
  stderr. A question too long on its own is refused with one line, and the
  chat goes on.
- Ctrl-C during an answer stops it; what was shown stays in the
  conversation as the answer. Ctrl-C at the prompt ends the chat (exit
  130, cli.py's one line); /quit, /exit or EOF (Ctrl-D) end it with exit 0.
"""

from __future__ import annotations

import argparse
import codecs
import os
import select
import signal
import sys

QUIT = ("/quit", "/exit")
PROMPT = "> "


def add_parser(sub) -> argparse.ArgumentParser:
  p = sub.add_parser("chat", help="chat in the terminal, streamed pass by "
                     "pass")
  p.add_argument("--model", help="checkpoint directory (HF or dynamo_jax) or "
                 "hub id; default: the embedded DynaMo-T3")
  p.add_argument("--revision")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--mode", default="dynamo",
                 choices=["dynamo", "verified", "ar"],
                 help="dynamo (default): the paper's multi-token sampling; "
                 "verified: heads draft, head 1 checks; ar: one token a pass")
  p.add_argument("--eps-b", type=float, default=0.5,
                 help="DynaMo back-off threshold in [0, 1] (1 = AR)")
  p.add_argument("--no-cooc", action="store_true",
                 help="no co-occurrence weighting (default: the model's "
                 "table, when it ships one)")
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--seed", type=int, default=0,
                 help="the seed of every answer")
  p.add_argument("--max-new-tokens", type=int, default=128,
                 help="the longest answer, in tokens")
  p.add_argument("--system", help="a system message that opens the "
                 "conversation (kept when old turns are dropped)")
  return p


def _fit(tokenizer, messages, template, limit: int) -> tuple[list, int, int]:
  """(messages, prompt ids, turns dropped): the oldest question/answer
  pairs dropped until the rendered prompt has at most `limit` tokens."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.chat.template import render
  head = [m for m in messages[:1] if m["role"] == "system"]
  turns = messages[len(head):]
  dropped = 0
  while True:
    kept = head + turns
    ids = tokenizer.encode(render(tokenizer, kept, add_generation_prompt=True,
                                  template=template))
    if len(ids) <= limit or len(turns) == 1:
      return kept, ids, dropped
    turns, dropped = turns[2:], dropped + 1  # a question and its answer


class _Stop:
  """A SIGINT handler that only records the Ctrl-C: an answer stops at the
  next chunk, never inside jax (an exception raised while jax traces or
  compiles can leave it broken: a crash at exit was seen)."""

  def __init__(self):
    self.pressed = False

  def __call__(self, signum, frame):  # pylint: disable=unused-argument
    self.pressed = True


class _Lines:
  """input() that Ctrl-C always interrupts. A signal goes to any thread
  that does not block it, and jax's threads do not: when one of them takes
  SIGINT, input() in the main thread keeps waiting. Here the main thread
  waits in select() on stdin and the signal wakeup pipe, which every
  thread's signal writes to, so KeyboardInterrupt comes at once."""

  def __init__(self):
    self._wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
    self._buffer = ""

  def read(self, prompt: str) -> str | None:
    """The next line (without its newline), or None at EOF."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    while "\n" not in self._buffer:
      ready, _, _ = select.select([sys.stdin.fileno(), self._wake_r], [], [])
      if self._wake_r in ready:
        os.read(self._wake_r, 512)  # a signal: its handler runs on return
      if sys.stdin.fileno() in ready:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:  # EOF: a last line without newline, then None
          rest, self._buffer = self._buffer + self._decoder.decode(
              b"", final=True), ""
          return rest or None
        self._buffer += self._decoder.decode(data)
    line, self._buffer = self._buffer.split("\n", 1)
    return line


def _answer(model, ids, settings) -> str:
  """Streams one answer to stdout; returns its text (what was shown)."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.chat.stream import stream
  shown, last, stop = [], None, _Stop()
  chunks = stream(model, ids, **settings)
  previous = signal.signal(signal.SIGINT, stop)
  try:
    for last in chunks:
      if stop.pressed:
        break
      sys.stdout.write(last.text)
      sys.stdout.flush()
      shown.append(last.text)
  finally:
    signal.signal(signal.SIGINT, previous)
    chunks.close()
  if stop.pressed:
    print("\n[answer stopped: Ctrl-C]", file=sys.stderr, flush=True)
    return "".join(shown)
  print(flush=True)
  if last is not None:
    rate = last.tokens / last.seconds if last.seconds > 0 else float("inf")
    compiled = (f"; compiled in {last.compile_seconds:.1f} s"
                if last.compile_seconds else "")
    print(f"[{last.tokens} tokens in {last.passes} passes: "
          f"{last.tokens_per_pass:.2f} tokens/pass, {rate:.1f} tokens/s, "
          f"ended by {last.finished}{compiled}]", file=sys.stderr, flush=True)
  return "".join(shown)


def run(args) -> None:
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.api import load
  from dynamo_jax.chat.template import chat_template, default_note, render
  from dynamo_jax.decoding.generate import max_prompt_length, prepare
  model = load(args.model, revision=args.revision, dtype=args.dtype)
  cooc = model.cooc if args.mode == "dynamo" and not args.no_cooc else None
  settings = dict(mode=args.mode, max_new_tokens=args.max_new_tokens,
                  greedy=args.greedy, temperature=args.temperature,
                  seed=args.seed, eps_b=args.eps_b, cooc=cooc)
  limit = max_prompt_length(model.config, args.mode, args.max_new_tokens)
  # Every setting checked (on a one-token prompt) before the chat starts.
  prepare(model.config, [[0]], **settings)
  template, source = chat_template(model.tokenizer)
  opening = [{"role": "system", "content": args.system}] if args.system else []
  render(model.tokenizer, opening + [{"role": "user", "content": "Hello."}],
         add_generation_prompt=True, template=template)  # renders at all?
  note = default_note(source)
  if note:
    print(note, file=sys.stderr, flush=True)
  messages = list(opening)
  lines = _Lines()
  while True:
    line = lines.read(PROMPT)
    if line is None:  # EOF (Ctrl-D)
      print()
      return
    question = line.strip()
    if question in QUIT:
      return
    if not question:
      continue
    try:
      messages = _turn(model, messages, question, template, limit, settings)
    except KeyboardInterrupt:  # while rendering: the question is dropped
      print("\n[answer stopped: Ctrl-C]", file=sys.stderr, flush=True)


def _turn(model, messages, question, template, limit, settings) -> list:
  """The conversation after `question` and its streamed answer."""
  asked, ids, dropped = _fit(
      model.tokenizer, messages + [{"role": "user", "content": question}],
      template, limit)
  if len(ids) > limit:
    print(f"error: this question makes a {len(ids)}-token prompt; at most "
          f"{limit} fit with --max-new-tokens "
          f"{settings['max_new_tokens']}. Ask something shorter.",
          file=sys.stderr, flush=True)
    return messages
  if dropped:
    print(f"[dropped the {dropped} oldest turn(s): the conversation "
          f"exceeded {limit} prompt tokens]", file=sys.stderr, flush=True)
  return asked + [{"role": "assistant",
                   "content": _answer(model, ids, settings)}]
