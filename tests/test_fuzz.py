"""Fuzzing the user-facing inputs: every config override and every `generate`
argument either works or raises a one-line DynamoError, never another
exception.

Derandomized (the same examples on every run) and without an example
database, so CI runs are reproducible. `generate` runs on one tiny model with
fixed shapes; a valid static argument (mode, greedy) takes one value per
compile, anything else is invalid and refused before tracing, so the whole
file stays within a few compiles.
"""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dynamo_jax
from dynamo_jax.data import DataConfig
from dynamo_jax.errors import DynamoError
from dynamo_jax.model import PythiaConfig, param_shapes, tiny_config
from dynamo_jax.training.config import (CONFIG_DIR, MeshConfig, ModelSpec,
                                        OptimConfig, TrainConfig, load_config)
from dynamo_jax.training.loop import model_config
from dynamo_jax.training.optimizer import make_optimizer

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _one_line_error(fn):
  """fn()'s result, or None when it raised a DynamoError with a one-line
  message; any other exception fails the test."""
  try:
    return fn()
  except DynamoError as e:
    assert str(e) and "\n" not in str(e), repr(str(e))
    return None


# ---- config overrides ----------------------------------------------------------

def _fields(cls, where=""):
  """{dotted key: default (MISSING if none)} of cls and its sections."""
  sections = {"model": ModelSpec, "optim": OptimConfig, "mesh": MeshConfig,
              "data": DataConfig}
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in sections and cls is TrainConfig:
      out[f.name] = dataclasses.MISSING
      out.update(_fields(sections[f.name], f"{f.name}."))
    else:
      out[where + f.name] = f.default
  return out


def _flat(d, where=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{where}{key}."))
    else:
      out[where + key] = value
  return out


KNOWN = {**_fields(TrainConfig), **_fields(PythiaConfig, "model.overrides.")}
with open(os.path.join(CONFIG_DIR, "tiny-test.json"), encoding="utf-8") as fh:
  TINY_TEST = _flat(json.load(fh))
# Each key's value in tiny-test, else its default: the centre to fuzz around.
CENTRE = {key: TINY_TEST.get(key, default) for key, default in KNOWN.items()
          if key in TINY_TEST or default is not dataclasses.MISSING}

# Plausible values too, so that some overrides pass and reach the checks
# across fields (batch vs grad_accum, weights vs heads, seq_len vs model).
plausible = st.sampled_from([
    -1, 0, 1, 2, 3, 4, 8, 16, 64, 128, 0.0, 0.5, 0.9, 1e-3, 1.0, None, True,
    False, [1, 1, 1], [1.0, 0.5, 0.0], ["x.txt"], "float32", "bfloat16",
    "heads_only", "copy", "last", "custom", "pythia-70m", "text", "tokens",
    "uint32", "gelu_tanh", 2**64, 10**400])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | plausible
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _near(centre):
  """Values around a key's centre: often valid, sometimes just out of range."""
  if isinstance(centre, bool):
    return st.booleans()
  if isinstance(centre, int):
    return st.integers(-2, 2 * centre + 2)
  if isinstance(centre, float):
    return st.floats(-0.5, 2 * centre + 1)
  return plausible


def _assign(key_values):
  return key_values.map(lambda kv: f"{kv[0]}={json.dumps(kv[1])}")


near_centre = st.sampled_from(sorted(CENTRE)).flatmap(
    lambda key: _assign(st.tuples(st.just(key), _near(CENTRE[key]))))
known_key = st.sampled_from(sorted(KNOWN))
override = st.one_of(
    near_centre, near_centre, near_centre, near_centre,
    _assign(st.tuples(known_key, plausible)),
    _assign(st.tuples(known_key, json_values)),
    st.tuples(known_key, st.text(max_size=8)).map(
        lambda kv: f"{kv[0]}={kv[1]}"),   # raw, usually not JSON: a string
    _assign(st.tuples(st.text(max_size=12), json_values)),  # unknown keys
    st.text(max_size=12),                                    # maybe no "="
)


@settings(FUZZ, max_examples=300)
@given(st.lists(override, max_size=2))
def test_config_overrides_load_or_raise_dynamo_error(overrides):
  cfg = _one_line_error(lambda: load_config("tiny-test", overrides))
  event("accepted" if cfg is not None else "refused")
  if cfg is not None:  # an accepted config builds its model and optimiser
    assert isinstance(cfg, TrainConfig)
    model_config(cfg)
    make_optimizer(cfg.optim, cfg.steps)


# ---- generate arguments --------------------------------------------------------

V, B, P = 61, 2, 3


@functools.cache
def _model():
  """A tiny T3 with random weights drawn in numpy (init_params would cost a
  compile; only shapes matter here)."""
  config = tiny_config(vocab_size=V, hidden_size=16, num_heads=2,
                       intermediate_size=32, num_token_heads=3,
                       max_position_embeddings=64)
  rng = np.random.RandomState(0)
  params = jax.tree.map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
      param_shapes(config))
  return config, params


junk = (st.none() | st.booleans() | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4)
        | st.lists(st.integers(-2, 2), max_size=3) | st.just(object())
        | st.just(np.zeros((2, 2))) | st.just(np.float32(0.5))
        | st.just(10**400))
not_int = junk.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
not_bool = junk.filter(lambda v: not isinstance(v, bool))


def _valid_alpha(v):
  # alpha is static under jit: a second valid value would cost a compile.
  return (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
          and 0 <= v < np.inf)


rows = st.lists(st.integers(0, V - 1), min_size=P, max_size=P)
good_ids = st.lists(rows, min_size=B, max_size=B).flatmap(
    lambda r: st.sampled_from([r, np.asarray(r, np.int32)]))
ragged = st.lists(st.lists(st.integers(0, V - 1), max_size=4), min_size=2,
                  max_size=3).filter(lambda r: len({len(x) for x in r}) > 1)
bad_ids = st.one_of(
    ragged,
    st.lists(st.lists(junk.filter(lambda v: not isinstance(v, (int, list))),
                      min_size=1, max_size=2), min_size=1, max_size=2),
    st.lists(st.integers(V, 2**70) | st.integers(max_value=-1),
             min_size=1, max_size=3).map(lambda r: [r]),  # outside the vocab
    st.lists(st.integers(0, V - 1), max_size=3),           # 1-d
    st.just([[]]), st.just(np.zeros((2, 3), np.float32)), st.text(max_size=3))


# One value per static argument (mode and greedy aside): each other valid
# value would be another compile of the decode loop.
VALID = dict(
    input_ids=good_ids, max_new_tokens=st.just(2),
    mode=st.sampled_from(["ar", "dynamo", "verified"]), greedy=st.booleans(),
    temperature=st.floats(0.05, 5), eps_b=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1) | st.lists(st.integers(0, 9), min_size=B,
                                              max_size=B),
    cooc=st.none(), k=st.just(50), alpha=st.just(1.0),
    repetition_penalty=st.floats(1, 3), kernel=st.just("reference"),
    exact_head1=st.just(True), use_cooc=st.just(True))
BAD = dict(
    input_ids=bad_ids,
    max_new_tokens=not_int | st.integers(max_value=0)
    | st.integers(min_value=10**3),
    mode=junk, greedy=not_bool, temperature=junk, eps_b=junk, seed=junk,
    cooc=junk.filter(lambda v: v is not None),
    k=not_int | st.integers(max_value=0) | st.integers(min_value=V + 1),
    alpha=junk.filter(lambda v: not _valid_alpha(v)),
    repetition_penalty=junk, kernel=junk,  # never "pallas": a slow compile
    exact_head1=not_bool, use_cooc=not_bool)


@st.composite
def generate_args(draw):
  """Valid arguments with zero, one or two of them replaced by junk."""
  args = {name: draw(strategy) for name, strategy in VALID.items()}
  for name in draw(st.lists(st.sampled_from(sorted(BAD)), max_size=2,
                            unique=True)):
    args[name] = draw(BAD[name])
  return args


@settings(FUZZ, max_examples=100)
@given(generate_args())
def test_generate_returns_or_raises_dynamo_error(args):
  config, params = _model()
  input_ids = args.pop("input_ids")
  out = _one_line_error(
      lambda: dynamo_jax.generate(config, params, input_ids, **args))
  event("decoded" if out is not None else "refused")
  if out is not None:
    assert out.tokens.shape == (B, 2)
    assert ((0 <= out.tokens) & (out.tokens < V)).all()


# ---- the findings, one by one ------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[[1, 2, 3], [4, 5]]), r"input_ids rows have different "
     r"lengths \[2, 3\]"),
    (dict(seed="7"), r"seed must be an int in 0..4294967295, or a list of "
     r"one int per row \(2 rows\), got '7'"),
    (dict(seed=1.5), r"seed must be an int in 0..4294967295"),
    (dict(seed=2**70), r"seed must be an int in 0..4294967295"),
    (dict(seed=-1), r"seed must be an int in 0..4294967295"),
    (dict(seed=[1, 2, 3]), r"seed must be .* got 3 seeds"),
    (dict(seed=True), r"seed must be an int"),
    (dict(temperature="0.7"), r"temperature must be a number, got '0.7'"),
    (dict(temperature=float("nan")), r"temperature must be > 0 and finite"),
    (dict(temperature=float("inf")), r"temperature must be > 0 and finite"),
    (dict(temperature=-0.5), r"temperature must be > 0 and finite"),
    (dict(temperature=10**400), r"temperature must be > 0 and finite"),
    (dict(temperature=-1.0, greedy=True), r"temperature must be a finite "
     r"number >= 0 \(greedy decoding ignores it\)"),
    (dict(cooc="x"), r"cooc must be None or a CoocTable"),
    (dict(cooc="x", mode="dynamo"), r"cooc must be None or a CoocTable"),
    (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=2.0), r"max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=True), r"max_new_tokens must be a positive integer"),
    (dict(mode="beam"), r"mode 'beam' unknown; available"),
    (dict(mode=None), r"mode None unknown"),
    (dict(eps_b=1.5), r"eps_b must lie in \[0, 1\]"),
    (dict(eps_b="0.5"), r"eps_b must be a number in \[0, 1\]"),
    (dict(k=0, mode="dynamo"), r"k must be an integer in 1..61"),
    (dict(k=2.5), r"k must be an integer"),
    (dict(greedy="yes"), r"greedy must be True or False"),
    (dict(alpha=-1.0), r"alpha must be a finite number >= 0"),
    (dict(repetition_penalty=0.5), r"repetition_penalty must be a finite "
     r"number >= 1"),
    (dict(kernel="triton"), r"kernel 'triton' unknown"),
])
def test_bad_generate_arguments_are_named(kwargs, match):
  config, params = _model()
  args = {"input_ids": np.ones((B, P), np.int32), "max_new_tokens": 2,
          **kwargs}
  with pytest.raises(DynamoError, match=match) as err:
    dynamo_jax.generate(config, params, args.pop("input_ids"), **args)
  assert "\n" not in str(err.value)


def test_generate_messages_name_both_spellings():
  """Errors a CLI user can hit suggest the flag as well as the keyword."""
  config, params = _model()
  ids = np.ones((B, P), np.int32)
  with pytest.raises(DynamoError, match=r"greedy=True / --greedy"):
    dynamo_jax.generate(config, params, ids, max_new_tokens=2, temperature=0)
  plain = config.replace(num_token_heads=1)
  with pytest.raises(DynamoError, match=r"mode='ar' / --mode ar"):
    dynamo_jax.generate(plain, params, ids, max_new_tokens=2, mode="dynamo")
