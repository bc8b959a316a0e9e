"""Streaming decoding: one chunk of text per forward pass.

`stream(model, prompt, ...)` runs a decoder's init (the prefill) and then its
per-pass body from a host loop, yielding after every pass the tokens that pass
emitted: with DynaMo a chunk holds 1..n tokens, so its multi-token steps are
visible as they happen. The tokens are those of
`generate(..., seed=seed)` for the same arguments, batch 1, cut at the first
EOS when `stop_at_eos` (same checks: `decoding.generate.prepare`; same
programs: each mode's `*_init` / `*_body`, which `generate` runs in a
`lax.while_loop` or `lax.scan`).

Text: each chunk decodes the whole answer so far and yields the new suffix,
so a character split over tokens (multi-byte UTF-8, merged tokens) comes out
whole; a trailing U+FFFD (an unfinished character) is held back until the
next pass completes it or the answer ends.

Compiling: init and body are compiled ahead of time, once per (mode, config,
static settings, argument shapes) and kept (the last `_KEEP` programs); the
body donates its state, so the cache is updated in place. The prompt length
is a shape: a new length compiles anew. `Chunk.seconds` excludes compiling.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from dynamo_jax.decoding.ar import ar_body, ar_init
from dynamo_jax.decoding.dynamo import dynamo_body, dynamo_init
from dynamo_jax.decoding.generate import Prepared, prepare
from dynamo_jax.decoding.tree import tree_body, tree_init
from dynamo_jax.decoding.verified import verified_body, verified_init
from dynamo_jax.errors import ConfigError, InputError

FINISHED = ("eos", "length")


@dataclasses.dataclass(frozen=True)
class Chunk:
  """What one forward pass added to the answer."""
  token_ids: tuple[int, ...]  # this pass's new tokens (cut at EOS, max)
  text: str              # the text they complete (see the module docstring)
  tokens: int            # tokens in the answer so far
  passes: int            # forward passes so far, the prefill included
  seconds: float         # since the prefill was dispatched (compile excluded)
  compile_seconds: float  # compiling before this answer (0 when cached)
  finished: str | None   # None, or why the answer ended: "eos" or "length"

  @property
  def tokens_per_pass(self) -> float:
    """Running mean: tokens in the answer so far / passes so far."""
    return self.tokens / self.passes


_KEEP = 16  # compiled (init, body) pairs kept; a chat compiles one per turn
_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _programs(mode: str, config, prep: Prepared):
  """(init(params, prompt, dyn), body(params, state, dyn), dyn, static):
  the mode's decoder with its static settings bound, its traced arguments
  `dyn`, and the static settings that key the compiled programs."""
  mx = prep.max_new_tokens
  if mode == "ar":
    dyn = (prep.row_keys_Bx2, prep.temperature)
    static = dict(greedy=prep.greedy)
    init = functools.partial(ar_init, max_new_tokens=mx, **static)
    body = functools.partial(ar_body, **static)
  elif mode == "dynamo":
    dyn = (prep.row_keys_Bx2, prep.table, prep.temperature, prep.eps_b,
           prep.repetition_penalty)
    static = dict(max_new_tokens=mx, settings=prep.settings)
    init = functools.partial(dynamo_init, **static)
    body = functools.partial(dynamo_body, **static)
  elif prep.tree:
    dyn = (prep.row_keys_Bx2, prep.temperature, prep.table)
    static = dict(max_new_tokens=mx, greedy=prep.greedy, paths=prep.tree,
                  k_tree=prep.k_tree, alpha=prep.settings.alpha)
    init = functools.partial(tree_init, **static)
    body = functools.partial(tree_body, **static)
  else:
    dyn = (prep.row_keys_Bx2, prep.temperature)
    static = dict(max_new_tokens=mx, greedy=prep.greedy)
    init = functools.partial(verified_init, **static)
    body = functools.partial(verified_body, **static)
  return ((lambda params, prompt, d: init(config, params, prompt, *d)),
          (lambda params, state, d: body(config, params, state, *d)),
          dyn, (mode, mx, tuple(sorted(static.items()))))


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                        for x in leaves)


def _compiled(mode: str, config, params, prep: Prepared
              ) -> tuple[Callable, Callable, Any, float]:
  """(init, body, dyn, seconds spent compiling now): compiled once per
  mode, config, static settings and argument shapes."""
  init, body, dyn, static = _programs(mode, config, prep)
  key = (config, static, _signature((params, prep.prompt_BxP, dyn)))
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return (*_COMPILED[key], dyn, 0.0)
  start = time.perf_counter()
  init_c = jax.jit(init).lower(params, prep.prompt_BxP, dyn).compile()
  state = jax.eval_shape(init, params, prep.prompt_BxP, dyn)
  body_c = jax.jit(body, donate_argnums=1).lower(params, state, dyn).compile()
  seconds = time.perf_counter() - start
  _COMPILED[key] = (init_c, body_c)
  while len(_COMPILED) > _KEEP:
    _COMPILED.popitem(last=False)
  return init_c, body_c, dyn, seconds


def _prompt_ids(tokenizer, prompt) -> list[list[int]]:
  """[[ids]]: text is encoded, a sequence of token ids is one row."""
  if isinstance(prompt, str):
    if not prompt:
      raise InputError("prompt is empty; give some text to continue.")
    return [list(tokenizer.encode(prompt))]
  if hasattr(prompt, "shape"):  # numpy or jax
    if np.ndim(prompt) != 1:
      raise InputError(f"prompt must be text or one sequence of token ids "
                       f"(stream decodes one row), got shape "
                       f"{tuple(np.shape(prompt))}.")
    return [np.asarray(prompt).tolist()]
  if not isinstance(prompt, (list, tuple)) or any(
      isinstance(t, (list, tuple, np.ndarray)) for t in prompt):
    raise InputError("prompt must be text or one sequence of token ids "
                     "(stream decodes one row).")
  return [list(prompt)]


def _visible(text: str, finished: bool) -> str:
  """The text that can be shown: an unfinished character held back."""
  return text if finished else text.rstrip("\ufffd")


def stream(model, prompt: str | Sequence[int], *, mode: str = "dynamo",
           max_new_tokens: int = 64, greedy: bool = False,
           temperature: float = 0.7, seed: int = 0, eps_b: float = 0.5,
           cooc=None, stop_at_eos: bool = True, **options) -> Iterator[Chunk]:
  """Decodes after `prompt`, yielding one `Chunk` per forward pass.

  model: a `dynamo_jax.load()` result (config, params, tokenizer).
  prompt: text, or one sequence of token ids.
  mode, max_new_tokens, greedy, temperature, seed, eps_b, cooc and
    `options` (k, alpha, use_cooc, blur, otsu, repetition_penalty, kernel,
    exact_head1, tree, k_tree): as `dynamo_jax.generate`'s (cooc: pass
    model.cooc for the model's own table). Checked before anything runs:
    InputError on bad input, as generate raises it.
  stop_at_eos: end the answer at the tokenizer's EOS (not shown); without
    it the answer runs to max_new_tokens.
  The last chunk has `finished` set. Closing the iterator early stops
  decoding after the pass in flight.
  """
  if not isinstance(stop_at_eos, bool):
    raise InputError(f"stop_at_eos must be True or False, got "
                     f"{stop_at_eos!r}.")
  eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
  if stop_at_eos and eos is None:
    raise InputError("the tokenizer has no eos_token_id, so stop_at_eos=True "
                     "cannot stop; pass stop_at_eos=False.")
  prep = prepare(model.config, _prompt_ids(model.tokenizer, prompt),
                 max_new_tokens=max_new_tokens, mode=mode, greedy=greedy,
                 temperature=temperature, eps_b=eps_b, seed=seed, cooc=cooc,
                 **options)
  if prep.prompt_BxP.shape[0] != 1:
    raise InputError("prompt must be one sequence of token ids (stream "
                     "decodes one row).")
  return _run(model, mode, prep, eos)


def _run(model, mode: str, prep: Prepared, eos: int | None
         ) -> Iterator[Chunk]:
  init, body, dyn, compile_seconds = _compiled(mode, model.config,
                                               model.params, prep)
  max_new = prep.max_new_tokens
  start = time.perf_counter()
  state = init(model.params, prep.prompt_BxP, dyn)
  kept: list[int] = []
  shown = ""
  while True:
    # Fetch this pass's tokens, then dispatch the next pass before the host
    # decodes and the caller prints: the two overlap.
    out_BxG, count_B, passes = jax.device_get(
        (state.out_BxG, state.count_B, state.passes))
    out_G, count, passes = out_BxG[0], int(count_B[0]), int(passes)
    seconds = time.perf_counter() - start
    new = out_G[len(kept):min(count, max_new)].tolist()
    finished = None
    if eos is not None and eos in new:
      new, finished = new[:new.index(eos)], "eos"
    elif count >= max_new or passes >= max_new:
      finished = "length"
    if finished is None:
      state = body(model.params, state, dyn)
    kept += new
    text = _visible(model.tokenizer.decode(kept), finished is not None)
    if not text.startswith(shown):  # shown text cannot be taken back
      raise ConfigError(
          f"the tokenizer decodes the longer answer with other text than it "
          f"showed ({shown[-20:]!r} became "
          f"{text[max(len(shown) - 20, 0):]!r}): streaming needs a decode "
          "whose prefix stays put; use generate.")
    piece, shown = text[len(shown):], text
    yield Chunk(token_ids=tuple(new), text=piece, tokens=len(kept),
                passes=passes, seconds=seconds,
                compile_seconds=compile_seconds, finished=finished)
    if finished is not None:
      return
