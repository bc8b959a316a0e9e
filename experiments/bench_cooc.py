"""Co-occurrence statistics: counting throughput and grid lookup latency.

Counting: a synthetic Zipf stream (p(rank r) ~ 1/r**s over a Pythia-sized
vocabulary of 50304, ids drawn i.i.d. by the alias method) is generated
chunk by chunk and fed to `NgramCounter` as one document. Reported:
tokens/s over the whole run (generation included, the conservative figure)
and without the main thread's generation time, peak RSS of the process
(resource.getrusage), and table sizes. Target: >= 5M tokens/s.

Lookup (unless --skip-lookup): the counted table goes to device
(`to_device`) and `grid_weights` is timed for B=1, K=50, M=2 and 3 (125,000
lookups for M=3) on 64 different top-k sets cycled through, so the caches
see new prefixes like a real decode; then the whole DynaMo-T3 sampler step
reading this table (`whole_sampler`), on logits whose top-k sets are drawn
the same way. For comparison: a lexicographic binary
search over the sorted keys split into two uint32 arrays (jnp, in this file
only), and the numpy reference. With --native-lookup, the native lookup
(kernels/cpu_cooc.py, the same arrays; its bits checked equal) is timed
beside the jnp walk: `native_lookup` and `whole_sampler.table_native_*`.
Target: the whole sampler <= 1 ms per step.

Run from the repo root on an otherwise idle machine (the 1-minute load
average is recorded before and after):

  .venv/bin/python experiments/bench_cooc.py
  .venv/bin/python experiments/bench_cooc.py --tokens 2e7 --skip-lookup
  .venv/bin/python experiments/bench_cooc.py --native-lookup

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

from dynamo_jax import cooc

VOCAB = 50304


class ZipfStream:
  """I.i.d. Zipf token ids, sampled in O(1) per token by the alias method."""

  def __init__(self, vocab_size: int, exponent: float, seed: int):
    p = 1.0 / np.arange(1, vocab_size + 1) ** exponent
    p /= p.sum()
    self.probs = p
    self._rng = np.random.default_rng(seed)
    # Alias table (Vose): column i keeps i with prob[i], else alias[i].
    scaled = p * vocab_size
    prob, alias = np.ones(vocab_size), np.arange(vocab_size)
    small = list(np.flatnonzero(scaled < 1))
    large = list(np.flatnonzero(scaled >= 1))
    while small and large:
      s, g = small.pop(), large.pop()
      prob[s], alias[s] = scaled[s], g
      scaled[g] -= 1 - scaled[s]
      (small if scaled[g] < 1 else large).append(g)
    self._prob = prob.astype(np.float32)
    self._alias = alias.astype(np.uint16)

  def draw(self, n: int) -> np.ndarray:
    col = self._rng.integers(0, self._prob.size, n, dtype=np.uint16)
    keep = self._rng.random(n, dtype=np.float32) < self._prob[col]
    return np.where(keep, col, self._alias[col])


def _machine() -> dict:
  model = "unknown"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem, 1),
          "platform": platform.platform(), "numpy": np.__version__}


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB


def bench_count(args) -> tuple[dict, cooc.CoocTable]:
  stream = ZipfStream(VOCAB, args.exponent, args.seed)
  rss_before = _peak_rss_gib()
  gen_s = 0.0
  start = time.perf_counter()
  with cooc.NgramCounter(VOCAB, args.max_order,
                         chunk_tokens=args.chunk_tokens,
                         memory_budget_bytes=int(args.memory_gb * 2**30),
                         progress=None) as counter:
    import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm.tqdm(total=args.tokens, unit="tok", unit_scale=True,
                    desc="counting", file=sys.stderr)
    done = 0
    while done < args.tokens:
      t = time.perf_counter()
      ids = stream.draw(min(args.chunk_tokens, args.tokens - done))
      gen_s += time.perf_counter() - t
      counter.add(ids, end_of_document=False)
      done += ids.size
      bar.update(ids.size)
    bar.close()
    stats = counter.stats()
    table = counter.finish(args.min_count, corpus=f"zipf s={args.exponent}")
  seconds = time.perf_counter() - start
  result = {
      "tokens": args.tokens, "vocab_size": VOCAB,
      "zipf_exponent": args.exponent,
      "max_order": args.max_order, "min_count": args.min_count,
      "chunk_tokens": args.chunk_tokens, "memory_budget_gib": args.memory_gb,
      "seconds": round(seconds, 2),
      "generation_seconds": round(gen_s, 2),
      "tokens_per_s": round(args.tokens / seconds),
      "tokens_per_s_excluding_generation": round(args.tokens /
                                                 (seconds - gen_s)),
      "peak_rss_gib": round(_peak_rss_gib(), 2),
      "rss_before_counting_gib": round(rss_before, 2),
      "table_ngrams": {str(m): int(k.size) for m, k in table.keys.items()},
      "table_bytes": int(sum(k.nbytes + c.nbytes for k, c in
                             zip(table.keys.values(), table.counts.values()))),
      "runs": {str(m): s for m, s in stats.items()},
  }
  return result, table


def _binary_search_fn(m_heads: int, vocab_size: int, num_keys: int):
  """jnp lookup by lexicographic binary search over (hi, lo) uint32 keys."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  steps = int(np.ceil(np.log2(num_keys + 1)))

  @jax.jit
  def search(hi_S, lo_S, count_S, ids_BxMxK):
    # The key of each grid entry as (hi, lo) = divmod(key, 2**32), built in
    # uint32 with a carry, since x64 is off.
    mesh = jnp.meshgrid(*[jnp.arange(ids_BxMxK.shape[2])] * m_heads,
                        indexing="ij")
    grid = [ids_BxMxK[:, i][:, mesh[i].ravel()].astype(jnp.uint32)
            for i in range(m_heads)]
    hi, lo = jnp.zeros_like(grid[0]), jnp.zeros_like(grid[0])
    v = jnp.uint32(vocab_size)
    for x in grid:  # (hi, lo) = (hi, lo) * V + x
      lo_lo, lo_hi = lo & 0xFFFF, lo >> 16
      p0 = lo_lo * v
      p1 = lo_hi * v + (p0 >> 16)
      new_lo = (p1 << 16) | (p0 & 0xFFFF)
      hi = hi * v + (p1 >> 16)
      lo = new_lo + x
      hi = hi + (lo < new_lo).astype(jnp.uint32)

    def body(_, bounds):
      left, right = bounds
      mid = (left + right) // 2
      less = (hi_S[mid] < hi) | ((hi_S[mid] == hi) & (lo_S[mid] < lo))
      return jnp.where(less, mid + 1, left), jnp.where(less, right, mid)

    left, _ = jax.lax.fori_loop(
        0, steps, body, (jnp.zeros(hi.shape, jnp.int32),
                         jnp.full(hi.shape, hi_S.shape[0], jnp.int32)))
    at = jnp.minimum(left, hi_S.shape[0] - 1)
    found = (hi_S[at] == hi) & (lo_S[at] == lo)
    return jnp.where(found, count_S[at], 0)

  return search


def _time(fn, inputs: list, repeats: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(inputs[0]))
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(inputs[i % len(inputs)]))
    times.append(time.perf_counter() - t)
  return {"median_ms": round(float(np.median(times)) * 1e3, 3),
          "p10_ms": round(float(np.percentile(times, 10)) * 1e3, 3),
          "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3)}


def bench_lookup(args, table: cooc.CoocTable) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  arrays = cooc.to_device(table)
  jax.block_until_ready(arrays)
  build_s = time.perf_counter() - start
  result = {"to_device_seconds": round(build_s, 2),
            "device_bytes": int(sum(x.nbytes for x in jax.tree.leaves(arrays))),
            "k": args.k, "queries": "top-k sets drawn from the Zipf law, "
            f"{args.query_sets} cycled"}
  stream = ZipfStream(VOCAB, args.exponent, args.seed + 1)
  rng = np.random.default_rng(args.seed + 2)
  fn = jax.jit(cooc.grid_weights)
  native = jax.jit(lambda a, q: cooc.DeviceTable(a, "native").grid_weights(q))
  for m in (2, 3):
    sets = [np.stack([[rng.choice(VOCAB, args.k, replace=False,
                                  p=stream.probs) for _ in range(m)]]
                     ).astype(np.int32) for _ in range(args.query_sets)]
    device_sets = [jnp.asarray(s) for s in sets]
    ours = np.asarray(fn(arrays, device_sets[0]))
    ref = cooc.grid_weights_numpy(table, sets[0])
    entry = {
        "lookups": args.k**m,
        "present_fraction": round(float((ref > 0).mean()), 4),
        "max_rel_err_vs_numpy": float(np.max(np.abs(ours - ref) /
                                             np.maximum(ref, 1e-30))),
        "cuckoo_trie_jit": _time(lambda q: fn(arrays, q), device_sets,
                                 args.repeats),
    }
    if args.native_lookup:  # the same arrays, read by kernels/cpu_cooc.cc
      assert np.array_equal(np.asarray(native(arrays, device_sets[0])), ours)
      entry["native_lookup"] = _time(lambda q: native(arrays, q), device_sets,
                                     args.repeats)
    t = time.perf_counter()
    for s in sets[:8]:
      cooc.grid_weights_numpy(table, s)
    entry["numpy_reference_ms"] = round((time.perf_counter() - t) / 8 * 1e3, 2)
    keys = table.keys[m]
    search = _binary_search_fn(m, VOCAB, keys.size)
    hi = jnp.asarray((keys >> np.uint64(32)).astype(np.uint32))
    lo = jnp.asarray((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    cnt = jnp.asarray(table.counts[m].astype(np.int32))
    found = np.asarray(search(hi, lo, cnt, device_sets[0])).reshape(ref.shape)
    assert np.array_equal(found > 0, ref > 0), "binary search disagrees"
    entry["binary_search_jit"] = _time(lambda q: search(hi, lo, cnt, q),
                                       device_sets, max(5, args.repeats // 20))
    result[f"m{m}"] = entry
  result["whole_sampler"] = bench_sampler_with_table(args, arrays, stream, rng)
  return result


def bench_sampler_with_table(args, arrays, stream, rng) -> dict:
  """The whole DynaMo-T3 sampler step (batch 1, k, n = 3, eps_b 0 / 0.5 /
  1, blur, Otsu, repetition penalty 1.1, temperature 0.7) reading this
  table. Logits over the 50304-token vocabulary are small noise except for
  each head's k Zipf-drawn ids, which get the top values, so the top-k sets
  (and the table blocks read) are those of the lookup timing above."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynamo_jax.cooc.lookup import DeviceTable  # pylint: disable=import-outside-toplevel
  from dynamo_jax.decoding import dynamo_sampler  # pylint: disable=import-outside-toplevel
  n = 3
  tables = [("table", DeviceTable(arrays))]
  if args.native_lookup:
    tables.append(("table_native", DeviceTable(arrays, "native")))
  logits = []
  for _ in range(args.query_sets):
    l_NxV = rng.normal(0.0, 0.1, (n, VOCAB)).astype(np.float32)
    for i in range(n):
      ids = rng.choice(VOCAB, args.k, replace=False, p=stream.probs)
      l_NxV[i, ids] = 4.0 + np.sort(rng.normal(0.0, 1.5, args.k))[::-1]
    logits.append(jnp.asarray(l_NxV[None]))
  history = jnp.asarray(rng.choice(VOCAB, (1, 64), p=stream.probs), jnp.int32)
  history_len = jnp.array([64], jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 1)
  temps = jnp.full((n,), 0.7, jnp.float32)
  # Scalars are device arrays made once: a jnp.float32(...) inside the timed
  # call is an eager dispatch (~0.1 ms here) that a decode step never pays.
  penalty = jnp.float32(1.1)
  sample = jax.jit(dynamo_sampler.dynamo_sample,
                   static_argnames=dynamo_sampler.STATIC_ARGNAMES)
  out = {"vocab": VOCAB, "n": n}
  for name, cooc_arg in [("no_table", None)] + tables:
    for eps_b in (0.0, 0.5, 1.0):
      run = lambda l, c=cooc_arg, e=jnp.float32(eps_b): sample(
          keys, l, history, history_len, c, n=n, k=args.k, temperature=temps,
          eps_b=e, repetition_penalty=penalty, use_cooc=c is not None)
      out[f"{name}_eps_b_{eps_b}"] = _time(run, logits, args.repeats)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=float, default=1e8)
  parser.add_argument("--max-order", type=int, default=3)
  parser.add_argument("--min-count", type=int, default=2)
  parser.add_argument("--exponent", type=float, default=1.0)
  parser.add_argument("--chunk-tokens", type=int, default=1 << 23)
  parser.add_argument("--memory-gb", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-lookup", action="store_true")
  parser.add_argument("--k", type=int, default=50)
  parser.add_argument("--query-sets", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=400)
  parser.add_argument("--native-lookup", action="store_true",
                      help="also time the native co-occurrence lookup "
                      "(kernels/cpu_cooc.py) on the same arrays")
  args = parser.parse_args()
  args.tokens = int(args.tokens)
  out = {"machine": _machine(), "load_avg_1min_before": os.getloadavg()[0]}
  out["count"], table = bench_count(args)
  if not args.skip_lookup:
    out["lookup"] = bench_lookup(args, table)
  out["load_avg_1min_after"] = os.getloadavg()[0]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
