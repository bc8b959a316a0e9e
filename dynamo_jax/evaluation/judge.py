"""A pairwise LLM judge over an OpenAI-compatible chat API, and
`python -m dynamo_jax eval judge` (the scoring itself is in judging.py).

Protocol (MT-Bench's pairwise one, with our own prompt text): the judge sees
a prompt and two responses, and ends its reply with [[A]] (A is better),
[[B]] or [[C]] (a tie). Every pair is asked twice, in both orders; two orders
that disagree are a tie, so a judge that always prefers the first position
yields only ties. Requests are POSTed to {base_url}/chat/completions with
temperature 0 (OpenAI, vLLM, sglang and llama.cpp servers all serve it).

Each verdict of one order is cached in its own file, named by a hash of the
judge model, the system prompt and the texts in their order, and written
atomically, so an interrupted run loses nothing and a re-run asks nothing
twice. The API key is read from an environment variable and sent only in the
Authorization header: it is never written to a file, a log, a repr or an
error message (server text quoted in errors is redacted).
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

from dynamo_jax.errors import DynamoError
from dynamo_jax.fileio import atomic_write_text
from dynamo_jax.fileio import remove_stale

SYSTEM_PROMPT = (
    "You are an impartial judge comparing two responses to the same prompt. "
    "The prompt may be a question, an instruction, or the opening words of a "
    "text that the responses continue. Decide which response is better: more "
    "fluent, coherent, relevant and informative, and, for a continuation, a "
    "natural continuation of the prompt. Neither the order in which the "
    "responses are shown nor their length is a reason to prefer one. Give a "
    "short justification, then end your reply with exactly one verdict: "
    "[[A]] if Response A is better, [[B]] if Response B is better, or [[C]] "
    "if they are about equally good.")

USER_TEMPLATE = ("[Prompt]\n{question}\n\n[Response A]\n{first}\n\n"
                 "[Response B]\n{second}\n\nWhich response is better?")

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# Server text quoted in an error, at most this many characters.
_QUOTE = 300


class JudgeError(DynamoError):
  """The judge gave no usable verdict, or its server refused the request."""


class JudgeConnectionError(JudgeError):
  """The judge's server could not be reached (refused, timed out, unknown host)."""


def parse_verdict(reply: str | None) -> str | None:
  """'A', 'B' or 'C' (a tie): the last [[A]] / [[B]] / [[C]] in the reply
  (judges reason first and conclude last); None when there is none."""
  found = _VERDICT.findall(reply or "")
  return found[-1] if found else None


def combine(first_order: str, swapped_order: str) -> str:
  """The outcome for answer a, from the verdict with a shown first (A = a)
  and the verdict with the order swapped (A = b): 'a', 'b' or 'tie'; two
  orders that disagree are a tie."""
  one = {"A": "a", "B": "b", "C": "tie"}[first_order]
  two = {"A": "b", "B": "a", "C": "tie"}[swapped_order]
  return one if one == two else "tie"


def _retry_after(headers) -> float | None:
  """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
  value = headers.get("Retry-After") if headers else None
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp()
               - time.time())
  except (TypeError, ValueError):
    return None


class PairwiseJudge:
  """compare(question, answer_a, answer_b) -> 'a', 'b' or 'tie'.

  `base_url` is the API root, e.g. https://api.openai.com/v1 or
  http://127.0.0.1:8000/v1. HTTP 429, 5xx, timeouts and connection errors
  are retried `max_retries` times with exponential backoff (`backoff`,
  2 * backoff, ... seconds; a Retry-After header's wait when the server
  sends one), and so is a reply without a verdict; then JudgeError (or
  JudgeConnectionError) says what went wrong. Other HTTP errors (401, 404)
  raise at once. `sleep` is the wait function (tests pass a fake one).
  `requests` counts the HTTP requests sent, `cache_hits` the verdicts read
  from `cache_dir`. Thread-safe: one judge may serve a pool of workers.
  A Retry-After wait is honoured as sent, however long.
  """

  def __init__(self, base_url: str, model: str, *,
               api_key_env: str = "OPENAI_API_KEY", max_retries: int = 3,
               cache_dir: str | None = None, timeout: float = 120.0,
               backoff: float = 1.0, sleep=time.sleep):
    if not re.match(r"https?://[^/]", base_url or ""):
      raise JudgeError(f"judge URL {base_url!r} is not an http(s) URL; give "
                       "the API root, e.g. http://127.0.0.1:8000/v1.")
    self.base_url = base_url.rstrip("/")
    self.url = f"{self.base_url}/chat/completions"
    self.model = model
    self.api_key_env = api_key_env
    self.max_retries = max_retries
    self.cache_dir = cache_dir
    self.timeout = timeout
    self.backoff = backoff
    self._sleep = sleep
    self._key = (os.environ.get(api_key_env) or None) if api_key_env else None
    self._lock = threading.Lock()
    self.requests = 0
    self.cache_hits = 0
    if cache_dir and os.path.isdir(cache_dir):  # made on the first verdict
      # Temp files of runs killed mid-write (the owner pid is in the name).
      for name in {e[1:e.index(".tmp-")] for e in os.listdir(cache_dir)
                   if e.startswith(".") and ".tmp-" in e}:
        remove_stale(cache_dir, name)

  def __repr__(self) -> str:
    key = "set" if self._key else "not set"
    return (f"PairwiseJudge(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r} ({key}))")

  def probe(self) -> None:
    """Raises JudgeConnectionError when the server cannot be reached, and
    JudgeError when it refuses the key (HTTP 401 / 403), from one GET of
    {base_url}/models (which OpenAI-compatible servers serve); any other
    answer, an error page included, shows a server is there. Callers probe
    before hours of generation, not after."""
    headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
    request = urllib.request.Request(f"{self.base_url}/models",
                                     headers=headers, method="GET")
    try:
      with urllib.request.urlopen(request, timeout=min(self.timeout, 30.0)):
        pass
    except urllib.error.HTTPError as e:
      if e.code in (401, 403):
        raise JudgeError(f"the judge at {self.base_url} refused the key: HTTP "
                         f"{e.code}; {self._hint(e.code)}.") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = getattr(e, "reason", e)
      raise JudgeConnectionError(
          f"cannot reach the judge at {self.base_url} ({type(reason).__name__}"
          f": {self._redact(str(reason))}): check that the server is running "
          "and that --judge-url is its OpenAI-compatible base URL (e.g. "
          "http://127.0.0.1:8000/v1).") from None

  def compare(self, question: str, answer_a: str, answer_b: str) -> str:
    """'a' when answer_a wins (in whichever order it was shown), 'b' when
    answer_b does, 'tie' for a tie or two orders that disagree."""
    return self.judge_pair(question, answer_a, answer_b)[0]

  def judge_pair(self, question: str, answer_a: str,
                 answer_b: str) -> tuple[str, str, str]:
    """(compare's outcome, the verdict with answer_a shown first, the
    verdict with answer_b shown first)."""
    first = self.verdict(question, answer_a, answer_b)
    swapped = self.verdict(question, answer_b, answer_a)
    return combine(first, swapped), first, swapped

  def verdict(self, question: str, first: str, second: str) -> str:
    """'A' (first is better), 'B' or 'C' (a tie) for one order, from the
    cache when this judge model has seen exactly these texts before."""
    user = USER_TEMPLATE.format(question=question, first=first, second=second)
    key = hashlib.sha256(json.dumps([self.model, SYSTEM_PROMPT, question,
                                     first, second]).encode()).hexdigest()
    path = os.path.join(self.cache_dir, f"{key}.json") if self.cache_dir else None
    if path and os.path.exists(path):
      try:
        with open(path, encoding="utf-8") as fh:
          cached = json.load(fh)["verdict"]
        if cached in ("A", "B", "C"):
          with self._lock:
            self.cache_hits += 1
          return cached
      except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable: ask again and overwrite it
    verdict, reply = self._ask(user)
    if path:
      record = {"judge_model": self.model, "verdict": verdict,
                "question": question, "first": first, "second": second,
                "reply": self._redact(reply)}
      os.makedirs(self.cache_dir, exist_ok=True)
      atomic_write_text(path, json.dumps(record, indent=1))
    return verdict

  def _redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key and text else text

  def _ask(self, user: str) -> tuple[str, str]:
    """(verdict, reply text), with the retries of the class docstring."""
    body = json.dumps({
        "model": self.model, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": user}]}).encode()
    headers = {"Content-Type": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    problem, unreachable = "", False
    for attempt in range(self.max_retries + 1):
      wait = None
      try:
        with self._lock:
          self.requests += 1
        request = urllib.request.Request(self.url, data=body, headers=headers,
                                         method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          payload = response.read()
      except urllib.error.HTTPError as e:
        try:
          text = self._redact(e.read(_QUOTE * 4).decode("utf-8", "replace"))
        except OSError:
          text = ""
        status = f"HTTP {e.code} {' '.join(text.split())[:_QUOTE]!r}"
        if e.code != 429 and e.code < 500:
          raise JudgeError(f"the judge at {self.url} refused the request: "
                           f"{status}; {self._hint(e.code)}") from None
        problem, unreachable, wait = status, False, _retry_after(e.headers)
      except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        problem = f"{type(reason).__name__}: {reason}"
        unreachable = True
      else:
        reply = _content(payload)
        found = parse_verdict(reply)
        if found:
          return found, reply
        problem = ("a reply without a verdict [[A]], [[B]] or [[C]], "
                   f"beginning {self._redact(reply or '')[:_QUOTE]!r}"
                   if reply is not None else "a response that is not an "
                   "OpenAI chat completion: " +
                   repr(self._redact(payload.decode('utf-8', 'replace'))[:_QUOTE]))
        unreachable = False
      if attempt < self.max_retries:
        self._sleep(self.backoff * 2 ** attempt if wait is None else wait)
    tries = f"{self.max_retries + 1} attempts"
    kept = (f" Verdicts obtained so far are kept in {self.cache_dir}."
            if self.cache_dir else "")
    if unreachable:
      raise JudgeConnectionError(
          f"cannot reach the judge at {self.url} ({problem}; {tries}): check "
          "that the server is running and that --judge-url is its "
          "OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)." + kept)
    raise JudgeError(f"the judge {self.model!r} at {self.url} gave no usable "
                     f"verdict in {tries}; the last was {problem}." + kept)

  def _hint(self, code: int) -> str:
    if code in (401, 403):
      return (f"check the API key in ${self.api_key_env}" if self._key else
              f"${self.api_key_env} is not set; export the API key there")
    if code == 404:
      return (f"check --judge-url (the API root, often ending in /v1) and "
              f"that the server serves the model {self.model!r}")
    return "check --judge-url and --judge-model"


def _content(payload: bytes) -> str | None:
  """choices[0].message.content of a chat completion, or None."""
  try:
    content = json.loads(payload)["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError):
    return None
  return content if isinstance(content, str) else None


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `judge` (under `eval`)."""
  p = subparsers.add_parser(
      "judge", help="score generations: reference NLL, distinct-n, "
      "repetition, pairwise LLM judge against AR, same-quality speed-up",
      description="Scores DIR/generations.jsonl (written by eval completions)"
      " against the AR row at the same prompt and seed; writes scores.jsonl, "
      "summary.json, summary.md and quality_vs_speedup.png.")
  p.add_argument("--generations", required=True, metavar="DIR",
                 help="directory holding generations.jsonl (or the file)")
  p.add_argument("--reference", metavar="M", help="model scoring the NLLs: "
                 "checkpoint directory or hub id (default: each generation's "
                 "own model, head 1)")
  add_judge_arguments(p, without="the quality axis is the offline NLL ratio",
                      cache="DIR/judge_cache")
  p.add_argument("--out", metavar="DIR", help="output directory (default "
                 "DIR/judge; its files are replaced)")
  p.add_argument("--json", action="store_true",
                 help="print summary.json instead of the markdown table")
  p.set_defaults(func=run)
  return p


def add_judge_arguments(p, *, without: str, cache: str) -> None:
  """The judge's options (shared by eval judge and eval chat): `without`
  says what happens with no judge, `cache` where verdicts go by default."""
  p.add_argument("--judge-url", metavar="URL", help="OpenAI-compatible API "
                 f"root, e.g. http://127.0.0.1:8000/v1; without it {without}")
  p.add_argument("--judge-model", metavar="NAME", help="the judge's model name")
  p.add_argument("--api-key-env", metavar="VAR", help="environment variable "
                 "holding the API key; when given it must be set (default: "
                 "OPENAI_API_KEY if set, else no Authorization header, as a "
                 "local server needs)")
  p.add_argument("--cache-dir", metavar="D", help=f"verdict cache (default: "
                 f"{cache}); a re-run never asks twice")
  p.add_argument("--workers", type=int, default=4,
                 help="concurrent judge requests (default 4)")
  p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                 help="bootstrap resamples for the intervals")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def judge_from_args(args, cache_dir: str) -> PairwiseJudge | None:
  """The PairwiseJudge the options of `add_judge_arguments` ask for (None
  without --judge-url), its verdicts cached in --cache-dir or `cache_dir`.
  Checks the options, not the server (`PairwiseJudge.probe` does); writes
  nothing."""
  if bool(args.judge_url) != bool(args.judge_model):
    raise DynamoError("give --judge-url and --judge-model together (or "
                      "neither, to go without a judge).")
  if args.workers < 1 or args.bootstrap < 0:
    raise DynamoError("--workers must be >= 1 and --bootstrap >= 0.")
  if args.api_key_env is not None and not os.environ.get(args.api_key_env):
    raise DynamoError(f"--api-key-env names ${args.api_key_env}, which is "
                      "not set (or empty); export the judge's API key there, "
                      "or leave --api-key-env out for a judge without a key.")
  if not args.judge_url:
    return None
  return PairwiseJudge(args.judge_url, args.judge_model,
                       api_key_env=args.api_key_env or "OPENAI_API_KEY",
                       cache_dir=args.cache_dir or cache_dir)


def run(args) -> dict:
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.evaluation import judge_report, judging
  path = args.generations
  if os.path.isdir(path):
    path = os.path.join(path, judging.GENERATIONS_FILE)
  base = os.path.dirname(os.path.abspath(path))
  judge = judge_from_args(args, os.path.join(base, "judge_cache"))
  if judge is not None:
    judge.probe()
  summary = judging.judge_generations(
      path, args.out or os.path.join(base, "judge"), reference=args.reference,
      judge=judge, bootstrap=args.bootstrap, seed=args.seed,
      workers=args.workers)
  if args.json:
    print(json.dumps(summary))
  else:
    print(judge_report.markdown(summary))
  return summary
