"""One decode pass against the HBM-bandwidth bound: plain AR vs DynaMo-T3.

For Pythia-shaped models with RANDOM weights (bf16 on accelerators), batch
1 and 8, with `--context` tokens already in the KV cache, this measures the
wall time of one forward pass of

  * AR: a cached forward pass over 1 token per row (head 1 only, the base
    Pythia, no `heads_*` parameters) plus drawing one token per row, in one
    jitted program: `ar_pass`, the body of `generate_ar`'s scan
    (decoding/ar.py);
  * T3: one `decode_step` (decoding/dynamo.py) of a DynaMo-T3 model: a chunk
    of T = 3 tokens through the stem, head 1 and the two extra head layers,
    `last_only` unembedding of all heads, then the DynaMo sampler. Timed with
    eps_b = 0 and no co-occurrence table (every pass emits 3 tokens, 3 fed)
    and with eps_b = 1 (always backs off to AR: 1 valid token fed of the 3,
    and the sampler also runs its order-1 Gumbel draw);
  * T3 split: the model part alone (`forward_cached(all_heads=True,
    last_only=True)` on the T = 3 chunk), the same with ONE unembedding
    matmul for all heads (`t3_model_one_unembed`, the `exact_head1=False`
    option: what reading embed_out once instead of twice saves; by default
    head 1 keeps its own matmul so that it equals the base model bit for
    bit), and the sampler alone (`sample_with_settings`, decoding/dynamo.py).

and compares the AR pass with its HBM-bandwidth bound

  bound_seconds = (weight bytes read + KV-cache bytes read) / bandwidth,

reporting fraction_of_bound = bound_seconds / measured_seconds (target >=
0.8) and T3 step / AR step (target <= 1.10), the GPU criteria.

Decisions (the programs and the byte accounting are
dynamo_jax/evaluation/passes.py, whose docstring says what is counted; the
timer is `measure` in dynamo_jax/evaluation/timing.py):
  * Weights are made on the device in the target dtype: `init_params` on a
    config whose param_dtype is that dtype is one jitted program whose
    outputs are the parameters, so pythia-6.9b in bf16 (~14 GB) never
    exists in float32 or on the host. The AR model is the same arrays minus
    the `heads_*` entries (a dict filter, no copy).
  * Attention reads the whole cache buffer, so each cache is allocated with
    max_len = context + T (T = 1 for AR, 3 for T3) and every timed call
    starts with `end` = context (a fresh `end` array is put into the
    threaded cache before each call, made outside the timer): the context
    never grows, positions stay in range, and the slots read are what a
    length-aware attention would read. The cache content is zeros; timing
    does not depend on values.
  * Caches are donated (as `ar_step` and a user's jitted `decode_step` do),
    so the returned cache is threaded into the next call.
  * Each program is compiled ahead of time (`jit(...).lower(...).compile()`,
    compile excluded from every timing) and called once untimed. Then two
    timings: `median`/`p10` over --repeats calls, each dispatched and
    blocked on alone (includes the host dispatch latency of one call, as a
    Python decode loop pays it), and `pipelined`: --repeats calls
    dispatched back to back, blocked once at the end, total / repeats (host
    dispatch overlaps device work, as in `generate`'s scan / while_loop,
    which have no dispatch at all). Fractions and ratios are given for both;
    `targets_met` uses the median, as the targets are stated.
  * Bandwidth: the vendor table or `--bandwidth-gbs`; for an unknown device
    (any CPU) the bound is null with the reason, never a guess. XLA's
    `cost_analysis()["bytes accessed"]` is recorded as a cross-check.

Run on a lent GPU (defaults: pythia-1.4b and pythia-6.9b, bf16, batch 1 and
8, context 512, 20 repeats):

  .venv/bin/python experiments/bench_step.py

On CPU (defaults there: pythia-70m and pythia-160m, float32):

  .venv/bin/python experiments/bench_step.py --presets pythia-70m --batches 1 --repeats 5

`--dry-run` only lowers every program for the given shapes (parameters and
caches as ShapeDtypeStructs, nothing allocated) and reports the byte counts
and bounds: a CPU check that e.g. pythia-6.9b shapes trace.

Prints one JSON object on stdout; one progress line per measurement on
stderr.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.decoding.ar import pass_keys
from dynamo_jax.decoding.dynamo import SamplerSettings
from dynamo_jax.decoding.sampling import row_keys
from dynamo_jax.evaluation.passes import (AR_PASS, MODEL_PASS, SAMPLER_PASS,
                                          T3_PASS, ar_params, bound_seconds,
                                          cost_bytes, device_bandwidth,
                                          kv_bytes, weight_bytes)
from dynamo_jax.evaluation.timing import measure
from dynamo_jax.model.config import PRESETS, PythiaConfig, preset, tiny_config
from dynamo_jax.model.pythia import init_cache, init_params, param_shapes

N_HEADS = 3  # DynaMo-T3
TARGET_FRACTION = 0.8
TARGET_T3_RATIO = 1.10
TEMPERATURE = 0.7
REPETITION_PENALTY = 1.1
HISTORY_LEN = 256  # tokens in the repetition-penalty history of a T3 pass
SETTINGS = SamplerSettings()  # k = 50, reference grid code, as `generate`
TINY = "tiny"  # hidden preset name: dynamo_jax.model.config.tiny_config()


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---- one model ------------------------------------------------------------------

def model_config(name: str, dtype: str) -> PythiaConfig:
  """The DynaMo-T3 config of a preset (or the hidden tiny one) in `dtype`."""
  base = tiny_config() if name == TINY else preset(name)
  return base.replace(num_token_heads=N_HEADS, dtype=dtype, param_dtype=dtype)


def _ms(seconds):
  return None if seconds is None else round(seconds * 1e3, 4)


def _ratio(a, b, digits=4):
  return None if a is None or b is None else round(a / b, digits)


def bench_batch(config_t3, params_t3, batch: int, context: int, repeats: int,
                gbs: float | None, dry_run: bool, seed: int) -> dict:
  """All figures of one (model, batch)."""
  config_ar = config_t3.replace(num_token_heads=1)
  params_ar = ar_params(params_t3)
  itemsize = np.dtype(config_t3.dtype).itemsize
  layers = config_t3.num_layers
  slots_ar, slots_t3 = context + 1, context + N_HEADS
  w_ar = weight_bytes(params_ar, batch, 1)
  w_t3 = weight_bytes(params_t3, batch, N_HEADS)
  kv_ar = kv_bytes(config_t3, batch, slots_ar, layers, itemsize)
  kv_t3 = kv_bytes(config_t3, batch, slots_t3, layers + N_HEADS - 1, itemsize)
  bound_ar = bound_seconds(w_ar["read"] + kv_ar, gbs)
  bound_t3 = bound_seconds(w_t3["read"] + kv_t3, gbs)
  out = {
      "weight_bytes": {"ar": w_ar["read"], "t3": w_t3["read"],
                       "ar_all_leaves": w_ar["all_leaves"],
                       "t3_all_leaves": w_t3["all_leaves"]},
      "kv_bytes": {"ar": kv_ar, "t3": kv_t3,
                   "ar_slots_read": slots_ar, "t3_slots_read": slots_t3,
                   "ar_cache_layers": layers,
                   "t3_cache_layers": layers + N_HEADS - 1},
      "bound_ms": None if gbs is None else {
          "ar": _ms(bound_ar), "t3": _ms(bound_t3),
          "ar_all_leaves": _ms(bound_seconds(w_ar["all_leaves"] + kv_ar, gbs)),
          "t3_all_leaves": _ms(bound_seconds(w_t3["all_leaves"] + kv_t3, gbs))},
  }

  # Inputs: device arrays (or their shapes for a dry run).
  rng = np.random.default_rng(seed)
  keys = row_keys(seed, batch)
  tokens_ar = jnp.asarray(rng.integers(0, config_t3.vocab_size, (batch, 1)),
                          jnp.int32)
  tokens_t3 = jnp.asarray(
      rng.integers(0, config_t3.vocab_size, (batch, N_HEADS)), jnp.int32)
  history = jnp.asarray(
      rng.integers(0, config_t3.vocab_size, (batch, HISTORY_LEN)), jnp.int32)
  history_len = jnp.full((batch,), HISTORY_LEN, jnp.int32)
  fed = {0.0: jnp.full((batch,), N_HEADS, jnp.int32),  # eps_b 0: 3 emitted
         1.0: jnp.ones((batch,), jnp.int32)}          # eps_b 1: 1 emitted
  pass_index = jnp.int32(1)
  sampler_keys = pass_keys(keys, 1)

  def make_cache(config, slots, all_heads):
    def build():
      cache = init_cache(config, batch, slots, all_heads=all_heads)
      return {**cache, "end": jnp.full((batch,), context, jnp.int32)}
    return jax.eval_shape(build) if dry_run else jax.jit(build)()

  cache_ar = make_cache(config_ar, slots_ar, False)
  cache_t3 = make_cache(config_t3, slots_t3, True)
  logits_shape = jax.ShapeDtypeStruct((batch, N_HEADS, config_t3.vocab_size),
                                      jnp.float32)

  temperature = jnp.float32(TEMPERATURE)
  temperature_N = jnp.full((N_HEADS,), TEMPERATURE, jnp.float32)
  penalty = jnp.float32(REPETITION_PENALTY)

  # Ahead-of-time compilation: compile time stays out of every timing.
  start = time.perf_counter()
  lowered = {
      "ar": AR_PASS.lower(config_ar, params_ar, cache_ar, tokens_ar, keys,
                          pass_index, temperature, greedy=False),
      # eps_b traced: one program serves eps_b = 0 and 1. No table.
      "t3": T3_PASS.lower(config_t3, params_t3, cache_t3, tokens_t3, fed[0.0],
                          sampler_keys, history, history_len, None,
                          temperature=temperature, eps_b=jnp.float32(0.0),
                          repetition_penalty=penalty, settings=SETTINGS),
      "t3_model": MODEL_PASS.lower(config_t3, params_t3, cache_t3, tokens_t3,
                                   fed[0.0], all_heads=True, last_only=True),
      "t3_model_one_unembed": MODEL_PASS.lower(
          config_t3, params_t3, cache_t3, tokens_t3, fed[0.0], all_heads=True,
          last_only=True, exact_head1=False),
      # Temperature per head, as a caller of the sampler may give it.
      "t3_sampler": SAMPLER_PASS.lower(
          sampler_keys, logits_shape, history, history_len, None, n=N_HEADS,
          temperature=temperature_N, eps_b=jnp.float32(0.0), repetition_penalty=penalty,
          settings=SETTINGS),
  }
  if dry_run:
    out["lowered_s"] = round(time.perf_counter() - start, 2)
    out["lowered"] = sorted(lowered)
    return out
  compiled = {name: low.compile() for name, low in lowered.items()}
  out["compile_s"] = round(time.perf_counter() - start, 2)
  out["xla_bytes_accessed"] = {name: cost_bytes(c)
                               for name, c in compiled.items()}

  def end_at_context():
    return jnp.full((batch,), context, jnp.int32)

  def report(label, stats):
    _log(f"  B={batch} {label}: median {stats['median']:.3f} ms, p10 "
         f"{stats['p10']:.3f} ms, pipelined {stats['pipelined']:.3f} ms")

  ar_stats, _, cache_ar = measure(
      lambda c: compiled["ar"](params_ar, c, tokens_ar, keys, pass_index,
                               temperature),
      cache_ar, end_at_context, repeats)
  report("ar_step", ar_stats)
  del cache_ar

  t3_stats, m_mean = {}, {}
  for eps_b in (0.0, 1.0):
    eps = jnp.float32(eps_b)
    stats, res, cache_t3 = measure(
        lambda c, eps=eps, eps_b=eps_b: compiled["t3"](
            params_t3, c, tokens_t3, fed[eps_b], sampler_keys, history,
            history_len, None, temperature=temperature, eps_b=eps,
            repetition_penalty=penalty),
        cache_t3, end_at_context, repeats)
    key = f"eps_b_{eps_b:g}"
    t3_stats[key] = stats
    m_mean[key] = float(np.mean(np.asarray(res.m_B)))
    report(f"t3_step {key} (mean m {m_mean[key]:.2f})", stats)

  model_stats, logits_NxBx1xV, cache_t3 = measure(
      lambda c: compiled["t3_model"](params_t3, c, tokens_t3, fed[0.0]),
      cache_t3, end_at_context, repeats)
  report("t3_model", model_stats)
  one_unembed_stats, logits_one, cache_t3 = measure(
      lambda c: compiled["t3_model_one_unembed"](params_t3, c, tokens_t3,
                                                 fed[0.0]),
      cache_t3, end_at_context, repeats)
  report("t3_model_one_unembed", one_unembed_stats)
  del cache_t3
  logits_BxNxV = jnp.swapaxes(logits_NxBx1xV[:, :, 0], 0, 1)
  sampler_stats = {}
  for eps_b in (0.0, 1.0):
    eps = jnp.float32(eps_b)
    stats, _, _ = measure(
        lambda c, eps=eps: (compiled["t3_sampler"](
            sampler_keys, logits_BxNxV, history, history_len, None,
            temperature=temperature_N, eps_b=eps, repetition_penalty=penalty),
                            None),
        None, end_at_context, repeats)
    sampler_stats[f"eps_b_{eps_b:g}"] = stats
    report(f"t3_sampler eps_b_{eps_b:g}", stats)

  def fraction(stat):
    if bound_ar is None:
      return None
    return round(bound_ar / (ar_stats[stat] * 1e-3), 4)

  out.update({
      "ar_step_ms": ar_stats,
      "fraction_of_bound": None if bound_ar is None else {
          "median": fraction("median"), "p10": fraction("p10"),
          "pipelined": fraction("pipelined")},
      "t3_fraction_of_bound": None if bound_t3 is None else {
          "median": round(bound_t3 / (t3_stats["eps_b_0"]["median"] * 1e-3),
                          4)},
      "t3_step_ms": t3_stats,
      "t3_mean_tokens_per_pass": m_mean,
      "t3_model_ms": model_stats,
      "t3_model_one_unembed_ms": one_unembed_stats,
      # Same inputs, same cache contents: how far the one-matmul logits
      # are from the library's (rounding only; 0 would mean no cost).
      "one_unembed_max_abs_logit_diff": float(jnp.max(jnp.abs(
          logits_one - logits_NxBx1xV))),
      "t3_sampler_ms": sampler_stats,
      "t3_model_plus_sampler_ms": round(model_stats["median"]
                                        + sampler_stats["eps_b_0"]["median"],
                                        4),
      "ratio_t3_over_ar": {
          f"{key}_{stat}": _ratio(t3_stats[key][stat], ar_stats[stat])
          for key in t3_stats for stat in ("median", "pipelined")},
  })
  ratios = out["ratio_t3_over_ar"]
  out["targets_met"] = {
      "ar_fraction_of_bound": (None if bound_ar is None else
                               out["fraction_of_bound"]["median"]
                               >= TARGET_FRACTION),
      "t3_over_ar_eps_b_0": ratios["eps_b_0_median"] <= TARGET_T3_RATIO,
      "t3_over_ar_eps_b_1": ratios["eps_b_1_median"] <= TARGET_T3_RATIO,
  }
  return out


def make_params(config: PythiaConfig, dry_run: bool, seed: int):
  """Random parameters on the device in config.param_dtype (ShapeDtypeStructs
  for a dry run)."""
  if dry_run:
    return param_shapes(config)
  params = init_params(config, seed)
  jax.block_until_ready(params)
  return params


def bench_preset(name: str, args, gbs: float | None) -> dict:
  config = model_config(name, args.dtype)
  _log(f"{name}: T3 {config.num_params() / 1e6:.1f}M params, {args.dtype}"
       f"{' (dry run)' if args.dry_run else ''}")
  start = time.perf_counter()
  params = make_params(config, args.dry_run, args.seed)
  init_s = time.perf_counter() - start
  leaves_t3 = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  leaves_ar = sum(int(np.prod(x.shape))
                  for x in jax.tree.leaves(ar_params(params)))
  result = {
      "config": {k: v for k, v in config.to_dict().items()
                 if k in ("vocab_size", "hidden_size", "num_layers",
                          "num_heads", "intermediate_size",
                          "max_position_embeddings", "num_token_heads",
                          "dtype", "param_dtype")},
      "params": {"ar": leaves_ar, "t3": leaves_t3,
                 "t3_num_params_formula": config.num_params()},
      "init_s": round(init_s, 2),
      "batches": {},
  }
  if args.context + N_HEADS > config.max_position_embeddings:
    result["warning"] = (f"context {args.context} + {N_HEADS} exceeds "
                         f"max_position_embeddings "
                         f"{config.max_position_embeddings} (timing is "
                         "unaffected; rotary positions extrapolate)")
  for batch in args.batches:
    result["batches"][str(batch)] = bench_batch(
        config, params, batch, args.context, args.repeats, gbs, args.dry_run,
        args.seed)
  del params
  gc.collect()
  return result


def main(argv=None) -> dict:
  accel = jax.default_backend() in ("gpu", "tpu")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+",
                      default=(["pythia-1.4b", "pythia-6.9b"] if accel
                               else ["pythia-70m", "pythia-160m"]),
                      choices=sorted(PRESETS) + [TINY],
                      help="Pythia shapes (T3 = preset + 2 head layers)")
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--context", type=int, default=512,
                      help="prompt tokens already in the KV cache")
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      default="bfloat16" if accel else "float32")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--bandwidth-gbs", type=float, default=None,
                      help="device memory bandwidth in GB/s (overrides the "
                      "table)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dry-run", action="store_true",
                      help="lower the programs for these shapes, allocate "
                      "nothing, report byte counts and bounds only")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.context < 1 or min(args.batches) < 1:
    parser.error("--repeats, --context and --batches must be positive")

  device = jax.devices()[0]
  gbs, source = device_bandwidth(device.device_kind, args.bandwidth_gbs)
  _log(f"device {device.device_kind} ({jax.default_backend()}), bandwidth "
       f"{gbs} GB/s [{source}]")
  results = {name: bench_preset(name, args, gbs) for name in args.presets}
  report = {
      "benchmark": "decode_step_vs_hbm_bound",
      "device": {"kind": device.device_kind,
                 "backend": jax.default_backend(),
                 "count": jax.device_count()},
      "versions": {"jax": jax.__version__,
                   "jaxlib": importlib.metadata.version("jaxlib"),
                   "flax": flax.__version__},
      "settings": {
          "presets": args.presets, "batches": args.batches,
          "context": args.context, "dtype": args.dtype,
          "repeats": args.repeats, "seed": args.seed, "dry_run": args.dry_run,
          "num_token_heads": N_HEADS, "temperature": TEMPERATURE,
          "repetition_penalty": REPETITION_PENALTY,
          "history_len": HISTORY_LEN, "sampler": SETTINGS._asdict(),
          "cooc": None,
          "weights": "random (init_params on device in dtype)",
      },
      "bandwidth": {"gbs": gbs, "source": source if gbs is not None else None,
                    "reason": None if gbs is not None else source},
      "accounting": {
          "bound": "(weight bytes read + KV bytes read) / bandwidth",
          "weights": "all leaves, input embedding counted as the B x T "
                     "gathered rows (see *_all_leaves for the whole table); "
                     "AR excludes heads_*",
          "kv": "attention reads the whole cache buffer (max_len slots) "
                "under a position mask, not just the filled part; caches "
                "are allocated with max_len = context + T (T = 1 AR, 3 T3) "
                "and end reset to context before every call, so "
                "slots_read = context + T",
          "timing": "median/p10: each call dispatched and blocked on alone "
                    "(host dispatch included); pipelined: repeats calls "
                    "back to back, one block, total / repeats",
          "targets_met": "from medians",
      },
      "targets": {"ar_fraction_of_bound_min": TARGET_FRACTION,
                  "t3_over_ar_max": TARGET_T3_RATIO},
      "results": results,
  }
  print(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
