"""`DynamoLM`: a dynamo_jax model as the lm-evaluation-harness model
"dynamo_jax". Head 1 (the base Pythia) scores; `generate` decodes.

This module imports lm_eval at its top: reach it through
`dynamo_jax.evaluation.harness`, which loads it on first use and says how to
install lm-eval when it is missing.

Tokenization follows lm-eval's HF model (TemplateLM): a context and its
continuation are encoded whole and split at the context's token length; an
empty context is the EOS token. Inputs longer than the model are cut from
the left.

Shapes: B rows (the batch_size option), T a padded length (a power of two,
at least 16, at most max_length), V vocabulary.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dynamo_jax.api import Model, load
from dynamo_jax.decoding.generate import MODES, SEED_MAX, generate
from dynamo_jax.errors import InputError
from dynamo_jax.model.pythia import forward
from dynamo_jax.tokenizer import ByteTokenizer
from dynamo_jax.training.loss import token_nll

MIN_BUCKET = 16


def _bad(name: str, value, need: str):
  return InputError(f"DynamoLM option {name}={value!r}: expected {need}.")


def _as_number(cast):
  """A parser to `cast` (int or float) of a number or its text; no bools, and
  no floats where an int is wanted."""
  kinds = (int, np.integer) + ((float, np.floating) if cast is float else ())

  def parse(name, value, need):
    if isinstance(value, kinds + (str,)) and not isinstance(value, bool):
      try:
        return cast(value.strip() if isinstance(value, str) else value)
      except ValueError:
        pass
    raise _bad(name, value, need)
  return parse


_as_int, _as_float = _as_number(int), _as_number(float)


def _as_bool(name, value, need):
  words = {"true": True, "1": True, "yes": True,
           "false": False, "0": False, "no": False}
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in words:
    return words[value.strip().lower()]
  raise _bad(name, value, need)


def _as_str(name, value, need):
  if value is None or isinstance(value, str):
    return value
  raise _bad(name, value, need)


# name -> (parser, default, what a good value is, extra range check or None).
# Values from model_args arrive as str, bool, int or float (lm-eval's
# simple_parse_args_string guesses); each is parsed to its own type here.
OPTIONS = {
    "mode": (_as_str, "ar", f"one of {MODES}", lambda v: v in MODES),
    "eps_b": (_as_float, 0.5, "a number in [0, 1] (1 is AR)",
              lambda v: 0 <= v <= 1),
    "temperature": (_as_float, 0.7, "a finite number > 0 (used when sampling)",
                    lambda v: 0 < v < math.inf),
    "greedy": (_as_bool, True, "true or false (requests that set do_sample "
               "or temperature decide for themselves)", None),
    "seed": (_as_int, 0, f"an integer in 0..{SEED_MAX}",
             lambda v: 0 <= v <= SEED_MAX),
    "max_gen_toks": (_as_int, 256, "a positive integer", lambda v: v >= 1),
    "use_cooc": (_as_bool, True, "true or false", None),
    "k": (_as_int, 50, "a positive integer", lambda v: v >= 1),
    "alpha": (_as_float, 1.0, "a finite number >= 0",
              lambda v: 0 <= v < math.inf),
    "repetition_penalty": (_as_float, 1.1, "a finite number >= 1",
                           lambda v: 1 <= v < math.inf),
    "batch_size": (_as_int, 8, "a positive integer (no 'auto': shapes are "
                   "fixed so that jit compiles are reused)", lambda v: v >= 1),
    "max_length": (_as_int, None, "a positive integer up to the model's "
                   "max_position_embeddings", lambda v: v >= 1),
    "revision": (_as_str, None, "a hub revision, e.g. step143000", None),
    "dtype": (_as_str, None, "a dtype name, e.g. float32 or bfloat16", None),
}

# Keys lm-eval's simple_evaluate adds to model_args (when set).
_NOT_SUPPORTED = {
    "device": "JAX places arrays on its default backend; choose it with "
              "JAX_PLATFORMS=cpu|cuda|tpu instead of device=",
    "max_batch_size": "it bounds batch_size=auto, which DynamoLM does not do; "
                      "set batch_size",
}

# gen_kwargs that only shape sampling: harmless under greedy decoding.
_SAMPLING_ONLY = {"top_k", "top_p", "min_p", "typical_p"}
# lm-eval's names for the number of new tokens, the first given wins.
_MAX_NEW = ("max_gen_toks", "max_new_tokens", "max_tokens",
            "max_completion_tokens")


def parse_options(options: dict) -> dict:
  """Every option with its default filled in, parsed and range-checked."""
  out = {}
  for name, value in options.items():
    if name in _NOT_SUPPORTED:
      if value is None:
        continue
      raise InputError(f"DynamoLM option {name}={value!r} is not supported: "
                       f"{_NOT_SUPPORTED[name]}.")
    if name not in OPTIONS:
      raise InputError(f"DynamoLM has no option {name!r}; known options: "
                       f"pretrained, {', '.join(OPTIONS)}.")
    parse, _, need, ok = OPTIONS[name]
    if value is None and OPTIONS[name][1] is None:
      out[name] = None
      continue
    parsed = parse(name, value, need)
    if ok is not None and not ok(parsed):
      raise _bad(name, value, need)
    out[name] = parsed
  return {name: out.get(name, spec[1]) for name, spec in OPTIONS.items()}


def _bucket(n: int, cap: int) -> int:
  """Padded length for n tokens: the next power of two, in [MIN_BUCKET, cap]."""
  return min(cap, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs(config, params, tokens_BxT, targets_BxT):
  """Head 1's log p(target) float32 [B, L] and its argmax int32 [B, L]."""
  logits_BxTxV = forward(config, params, tokens_BxT)
  return (-token_nll(logits_BxTxV, targets_BxT),
          jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32))


@register_model("dynamo_jax")
class DynamoLM(TemplateLM):
  """lm-eval model over a dynamo_jax checkpoint.

  pretrained: None (the embedded default model), a checkpoint directory or
    hub id (`dynamo_jax.load`), or a loaded `dynamo_jax.Model`.
  options (`OPTIONS`; strings from model_args are parsed): batch_size,
    max_length (default max_position_embeddings), revision and dtype (for
    loading), and generate_until's decoding: mode (ar | dynamo | verified),
    eps_b, greedy, temperature, seed, max_gen_toks, use_cooc, k, alpha,
    repetition_penalty. A request's gen_kwargs (until, do_sample,
    temperature, max_gen_toks) override the defaults they name.
  """

  def __init__(self, pretrained=None, **options):
    super().__init__()
    self.options = parse_options(options)
    if isinstance(pretrained, Model):
      model = pretrained
    else:
      if pretrained is not None and not isinstance(pretrained, str):
        raise InputError(f"DynamoLM pretrained={pretrained!r}: expected None "
                         "(the embedded model), a checkpoint directory or hub "
                         "id, or a dynamo_jax.Model.")
      model = load(pretrained, revision=self.options["revision"],
                   dtype=self.options["dtype"])
    self.source = pretrained if isinstance(pretrained, str) else None
    self.model = model
    self.tokenizer = model.tokenizer
    limit = model.config.max_position_embeddings
    if (self.options["max_length"] or 0) > limit:
      raise _bad("max_length", self.options["max_length"],
                 f"at most max_position_embeddings={limit}")
    mode = self.options["mode"]
    if mode != "ar" and model.config.num_token_heads < 2:
      raise InputError(f"DynamoLM option mode={mode!r} needs a DynaMo model "
                       "with token heads; this model has only head 1 (use "
                       "mode=ar).")

  # ---- what TemplateLM asks for ---------------------------------------------

  @property
  def eot_token_id(self) -> int:
    eos = getattr(self.tokenizer, "eos_token_id", None)
    return self.model.config.eos_token_id if eos is None else int(eos)

  @property
  def max_length(self) -> int:
    return (self.options["max_length"]
            or self.model.config.max_position_embeddings)

  @property
  def batch_size(self) -> int:
    return self.options["batch_size"]

  def get_model_info(self) -> dict:
    """Merged into simple_evaluate's results["config"]."""
    return {"dynamo_jax_model": self.source or "embedded default model",
            "dynamo_jax_options": dict(self.options)}

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs):
    if add_special_tokens is None or isinstance(self.tokenizer, ByteTokenizer):
      return list(self.tokenizer.encode(string))
    return list(self.tokenizer.encode(string,
                                      add_special_tokens=add_special_tokens))

  def tok_decode(self, ids) -> str:
    if isinstance(self.tokenizer, ByteTokenizer):
      return self.tokenizer.decode(ids)
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  # ---- scoring ---------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs):
    """(sum of log p(continuation), every continuation token the argmax) for
    ((context, continuation), context ids, continuation ids) requests."""
    rows = []
    for _, context_enc, continuation_enc in requests:
      if len(continuation_enc) > self.max_length:
        raise InputError(f"a continuation of {len(continuation_enc)} tokens "
                         f"exceeds the model's max_length {self.max_length}.")
      whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
      rows.append((whole, len(continuation_enc)))
    results = self._score(rows, "loglikelihood", disable_tqdm)
    for (strings, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", strings, result)
    return results

  def _score(self, rows, desc: str, disable_tqdm: bool):
    """rows: (tokens, c); scores the last c tokens of each from those before,
    in batches of [batch_size, bucketed length] padded with EOS."""
    b = self.batch_size
    pad = self.eot_token_id
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [(0.0, True)] * len(rows)  # an empty continuation: log 1
    todo = [i for i in order if rows[i][1] > 0]
    with tqdm(total=len(rows), desc=desc, disable=disable_tqdm) as bar:
      bar.update(len(rows) - len(todo))
      for start in range(0, len(todo), b):
        chunk = todo[start:start + b]
        width = _bucket(len(rows[chunk[0]][0]) - 1, self.max_length)
        tokens_BxT = np.full((b, width), pad, np.int32)
        targets_BxT = np.full((b, width), pad, np.int32)
        for r, i in enumerate(chunk):
          whole = rows[i][0]
          tokens_BxT[r, :len(whole) - 1] = whole[:-1]
          targets_BxT[r, :len(whole) - 1] = whole[1:]
        logp_BxT, best_BxT = jax.device_get(_target_logprobs(
            self.model.config, self.model.params, jnp.asarray(tokens_BxT),
            jnp.asarray(targets_BxT)))
        for r, i in enumerate(chunk):
          whole, c = rows[i]
          span = slice(len(whole) - 1 - c, len(whole) - 1)
          results[i] = (float(np.sum(logp_BxT[r, span], dtype=np.float64)),
                        bool(np.all(best_BxT[r, span] == targets_BxT[r, span])))
        bar.update(len(chunk))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """Sum of log p over every token of each string, the first predicted
    from EOS, in windows of max_length (lm-eval's rolling windows)."""
    rows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for context, pred in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        rows.append((context + pred, len(pred)))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self._score(rows, "loglikelihood_rolling",
                                               disable_tqdm)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---- generation ------------------------------------------------------------

  def _settings(self, gen_kwargs) -> tuple[tuple[bool, float, int], list[str]]:
    """((greedy, temperature, max_new_tokens), stop strings) of a request."""
    if not isinstance(gen_kwargs, dict):
      raise InputError(f"generate_until gen_kwargs must be a dict, got "
                       f"{type(gen_kwargs).__name__}.")
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
      raise InputError(f"gen_kwargs until must be a string or a list of "
                       f"strings, got {gen_kwargs.get('until')!r}.")
    given = [kw.pop(name) for name in _MAX_NEW if name in kw]
    max_new = given[0] if given else self.options["max_gen_toks"]
    do_sample, temperature = kw.pop("do_sample", None), kw.pop("temperature", None)
    try:
      temperature = float(temperature or 0.0)
    except (TypeError, ValueError):
      raise InputError(f"gen_kwargs temperature must be a number, got "
                       f"{temperature!r}.") from None
    if do_sample is None and "temperature" not in gen_kwargs:
      greedy, temperature = self.options["greedy"], self.options["temperature"]
    else:  # lm-eval's reading: do_sample, else sampling iff temperature > 0
      greedy = not (temperature > 0 if do_sample is None else bool(do_sample))
      temperature = temperature if temperature > 0 else self.options["temperature"]
    unknown = sorted(set(kw) - (_SAMPLING_ONLY if greedy else set()))
    if unknown:
      raise InputError(f"gen_kwargs {unknown} are not supported by DynamoLM; it "
                       "reads until, do_sample, temperature and max_gen_toks "
                       "(or max_new_tokens), and ignores top_k/top_p only "
                       "when decoding greedily.")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
      raise InputError(f"gen_kwargs max_gen_toks must be a positive integer, "
                       f"got {max_new!r}.")
    return (bool(greedy), float(temperature), int(max_new)), until

  def _row_seed(self, context: str, repeat: int) -> int:
    """A row's seed from its context and repeat number (the k-th copy of a
    request gets repeat k): what a request gets does not depend on the batch
    or the order it comes in, and two requests that differ only in their
    stop strings get one sample, cut in two places."""
    text = json.dumps([self.options["seed"], repeat, context])
    return zlib.crc32(text.encode("utf-8")) & SEED_MAX

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Continuations cut at the first EOS token, then at the first stop
    string. generate() takes no padding mask, so a batch holds prompts of
    one token length (a compile per length, rows padded to batch_size)."""
    opts = self.options
    heads = self.model.config.num_token_heads if opts["mode"] != "ar" else 1
    groups = collections.defaultdict(list)
    repeats = collections.Counter()
    for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
      settings, until = self._settings(gen_kwargs)
      # generate() needs prompt + new tokens + look-ahead inside the model.
      room = self.max_length - settings[2] - (heads - 1)
      if room < 1:
        raise InputError(f"max_gen_toks {settings[2]} leaves no room for a "
                         f"prompt in max_length {self.max_length}; ask for "
                         "fewer tokens.")
      prompt = (self.tok_encode(context) or [self.prefix_token_id])[-room:]
      key = json.dumps([context, gen_kwargs], sort_keys=True, default=str)
      seed = self._row_seed(context, repeats[key])
      repeats[key] += 1
      groups[settings, len(prompt)].append((i, prompt, seed, until))
    cooc = (self.model.cooc if opts["mode"] == "dynamo" and opts["use_cooc"]
            else None)
    out = [None] * len(requests)
    b = self.batch_size
    with tqdm(total=len(requests), desc="generate_until",
              disable=disable_tqdm) as bar:
      for ((greedy, temperature, max_new), _), rows in groups.items():
        for start in range(0, len(rows), b):
          chunk = rows[start:start + b]
          padded = chunk + [chunk[0]] * (b - len(chunk))
          tokens = generate(
              self.model.config, self.model.params,
              np.asarray([r[1] for r in padded], np.int32),
              max_new_tokens=max_new, mode=opts["mode"], greedy=greedy,
              temperature=temperature, eps_b=opts["eps_b"],
              seed=[r[2] for r in padded], cooc=cooc, k=opts["k"],
              alpha=opts["alpha"], use_cooc=opts["use_cooc"],
              repetition_penalty=opts["repetition_penalty"]).tokens
          for (i, _, _, until), row in zip(chunk, tokens):
            out[i] = self._finish(row, until)
            self.cache_hook.add_partial("generate_until", requests[i].args,
                                        out[i])
          bar.update(len(chunk))
    return out

  def _finish(self, tokens, until: list[str]) -> str:
    tokens = [int(t) for t in tokens]
    if self.eot_token_id in tokens:
      tokens = tokens[:tokens.index(self.eot_token_id)]
    text = self.tok_decode(tokens)
    ends = [text.index(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text
