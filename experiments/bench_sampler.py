"""Per-step cost of the DynaMo sampler (dynamo_jax/decoding/dynamo_sampler.py).

Setting: V = 50304 (Pythia's padded vocabulary), k = 50, n = 3, batch 1 and 8,
random logits (N(0, 3^2), which makes the heads fairly peaked), random
histories of 64 tokens, float32, jitted, on this machine's CPU. Targets: the
whole sampler <= 1 ms per step at batch 1; with the embedded model's table
(below) <= 0.3 ms.

Each timing is the median over `--repeats` calls, each ended by
block_until_ready, after a warm-up call (the compile). Reported per batch and
per co-occurrence setting:
  * total_ms[eps_b] (and total_p10_ms, the 10th percentile: on a shared
    2-core machine other processes' load inflates the median): the jitted
    sampler (`dynamo_sample` under jit, what a caller inside jit pays) for
    eps_b = 0 (every row emits n: order 1 is skipped by its lax.cond), 0.5, and 1
    (every row backs off to plain AR, which pays the full-vocabulary Gumbel
    draw); wrapper_ms: the public `dynamo_sample` with its Python argument
    checks, at eps_b = 0.5; m_mean: mean m emitted.
  * stages_ms: the same work cut into separately jitted stages of library
    calls, at eps_b = 0 (compare with total_ms["0.0"]): topk
    (`topk_marginals`: top-k of n heads, renormalised marginals, history
    mask; and `tuple_uniforms`), cooc_weights (`order_weights`, all orders),
    blur (`ops.grid.gaussian_blur3` of every order's joint), otsu
    (`ops.grid.otsu_keep`: histogram, split, mask), grid_draw
    (`kernels.threshold_and_draw(kernel="reference", blur=False,
    otsu=False)`: joint grids, eps_b mask, penalty, back-off test, draws;
    order 1 skipped). Their sum exceeds the fused total by each stage's
    dispatch overhead and the lost fusion. order1_ar: the order-1 draw alone
    (plain AR over the full vocabulary), which rows that back off to m = 1
    add.
  * plain_ar_ms: `sampling.sample_tokens` (jax.random.categorical per row),
    the plain AR decoder's sampler, for scale.

The "cooc_standin" case uses a STAND-IN for the table lookup:
`FixedCooc.grid_weights` returns a fixed random [B, K, ..., K] grid with ~half
its entries exactly 0, whatever the ids, so only the weighting is timed, not
the lookup.

The "embedded_model" case (unless --skip-embedded) is the real thing at
batch 1: the embedded default model's heads on 64 consecutive positions of
its test sample (V = 4096) give the logits, the 64 tokens before them the
history, and the sampler reads the model's real co-occurrence table (the
cuckoo trie of dynamo_jax/cooc/lookup.py). Each timing cycles through the 64
positions, so the top-k sets and table blocks change from call to call as in
a decode. Reported with and without the table, at eps_b 0, 0.5, 1, plus the
table lookups alone (M = 2 and 3). A Pile-sized table (400 MB on device)
is slower to read: experiments/bench_cooc.py times that lookup.

With `--native-lookup` the embedded case is also timed with the native
co-occurrence lookup (kernels/cpu_cooc.py: `cooc_table_native`,
`lookup_ms_native`), in the same process over the same table arrays.

With `--baseline REV` the embedded case also times the sampler of git
revision REV (its dynamo_jax, extracted to a temporary folder and imported
under another name) against this checkout's, calls alternating between the
two on the same inputs, so that before and after see the same load
(`baseline`: median and p10 of each, with and without the table).

Prints one JSON object. Run from the repo root:

  .venv/bin/python experiments/bench_sampler.py
  .venv/bin/python experiments/bench_sampler.py --batches 1 --repeats 100
  .venv/bin/python experiments/bench_sampler.py --batches 1 --baseline HEAD~3
  .venv/bin/python experiments/bench_sampler.py --batches 1 --native-lookup
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import kernels
from dynamo_jax.cooc import lookup as lookup_lib
from dynamo_jax.decoding import dynamo_sampler as ds
from dynamo_jax.decoding.sampling import sample_tokens
from dynamo_jax.ops import grid

VOCAB, K, N, HISTORY = 50304, 50, 3, 64
TEMPERATURE, RP = 0.7, 1.1
SAMPLE = jax.jit(ds.dynamo_sample, static_argnames=ds.STATIC_ARGNAMES)


@jax.tree_util.register_pytree_node_class
class FixedCooc:
  """STAND-IN for the co-occurrence table: fixed random weight grids."""

  def __init__(self, grids):
    self.grids = grids  # {m: float32 [B, K, ..., K]}

  @classmethod
  def random(cls, batch, seed=0):
    rng = np.random.RandomState(seed)
    grids = {}
    for m in range(2, N + 1):
      w = rng.gamma(1.0, size=(batch,) + (K,) * m)
      grids[m] = jnp.asarray(np.where(rng.rand(*w.shape) < 0.5, 0.0, w),
                             jnp.float32)
    return cls(grids)

  def tree_flatten(self):
    keys = sorted(self.grids)
    return [self.grids[m] for m in keys], keys

  @classmethod
  def tree_unflatten(cls, keys, children):
    return cls(dict(zip(keys, children)))

  def grid_weights(self, topk_ids_BxMxK, alpha):
    del alpha  # the stand-in's grids are final weights already
    return self.grids[topk_ids_BxMxK.shape[1]]


def _times_ms(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))
  return times


def _median_ms(fn, repeats):
  return round(statistics.median(_times_ms(fn, repeats)), 4)


def _stages(keys, logits, history, history_len, cooc, eps_b, repeats):
  """Median ms of each stage, jitted separately, fed the previous outputs."""
  temps = jnp.full((N,), TEMPERATURE, jnp.float32)
  use_cooc = cooc is not None

  @jax.jit
  def topk(keys, logits):
    out = ds.topk_marginals(logits[:, :N], temps, history, history_len, k=K)
    return out, ds.tuple_uniforms(keys, logits.shape[0], per_row=True)

  cooc_weights = jax.jit(lambda ids, cooc: ds.order_weights(
      ids, cooc, n=N, k=K, alpha=1.0, use_cooc=use_cooc))
  joints = jax.jit(lambda probs, weights: [
      grid.joint_grid(probs[:, :m], w)
      for m, w in zip(range(2, N + 1), weights)])  # the blur's input
  blur = jax.jit(lambda joints: [grid.gaussian_blur3(j) for j in joints])
  otsu = jax.jit(lambda scores: [grid.otsu_keep(
      s.reshape(s.shape[0], -1)) for s in scores])
  grid_draw = jax.jit(lambda ids, probs, seen, weights, u:
                      kernels.threshold_and_draw(
                          ids, probs, seen, weights, jnp.float32(eps_b),
                          jnp.float32(RP), u, blur=False, otsu=False,
                          kernel="reference"))

  (ids, probs, seen), u = topk(keys, logits)
  weights = cooc_weights(ids, cooc)
  joint_grids = joints(probs, weights)
  scores = blur(joint_grids)
  return {
      "topk": _median_ms(lambda: topk(keys, logits), repeats),
      "cooc_weights": _median_ms(lambda: cooc_weights(ids, cooc), repeats),
      "blur": _median_ms(lambda: blur(joint_grids), repeats),
      "otsu": _median_ms(lambda: otsu(scores), repeats),
      "grid_draw": _median_ms(lambda: grid_draw(ids, probs, seen, weights,
                                                u), repeats),
  }


def _bench(batch, cooc, repeats):
  rng = np.random.RandomState(batch)
  logits = jnp.asarray(rng.randn(batch, N, VOCAB) * 3.0, jnp.float32)
  history = jnp.asarray(rng.randint(0, VOCAB, (batch, HISTORY)), jnp.int32)
  history_len = jnp.full((batch,), HISTORY, jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  temps = jnp.full((N,), TEMPERATURE, jnp.float32)
  out = {"total_ms": {}, "total_p10_ms": {}, "m_mean": {}}
  rp = jnp.float32(RP)
  for eps_b in (0.0, 0.5, 1.0):
    # dynamo_sample under jit, as inside a decode step: its host-side checks
    # run once at trace time, not per call.
    run = lambda e=jnp.float32(eps_b): SAMPLE(
        keys, logits, history, history_len, cooc, n=N, k=K, temperature=temps,
        eps_b=e, repetition_penalty=rp, use_cooc=cooc is not None)
    times = _times_ms(run, repeats)
    out["total_ms"][str(eps_b)] = round(statistics.median(times), 4)
    out["total_p10_ms"][str(eps_b)] = round(float(np.percentile(times, 10)), 4)
    out["m_mean"][str(eps_b)] = float(np.mean(run().m_B))
  out["wrapper_ms"] = _median_ms(lambda: ds.dynamo_sample(
      keys, logits, history, history_len, cooc, n=N, k=K,
      temperature=TEMPERATURE, eps_b=0.5, repetition_penalty=RP), repeats)
  out["stages_ms"] = _stages(keys, logits, history, history_len, cooc, 0.0,
                             repeats)
  out["stages_ms"]["sum"] = round(sum(out["stages_ms"].values()), 4)
  order1 = jax.jit(lambda keys, l: ds.plain_ar(
      keys, l[:, 0], temps[0], greedy=False, per_row=True))
  out["stages_ms"]["order1_ar"] = _median_ms(lambda: order1(keys, logits),
                                             repeats)
  sample_ar = jax.jit(lambda keys, l: sample_tokens(
      keys, l[:, 0], greedy=False, temperature=TEMPERATURE))
  out["plain_ar_ms"] = _median_ms(lambda: sample_ar(keys, logits), repeats)
  return out


def _embedded_inputs():
  """(logits [64, N, V], history [1, 64], history_len [1], DeviceTable) from
  the embedded default model on its test sample."""
  # pylint: disable=import-outside-toplevel
  import dynamo_jax
  from dynamo_jax.default_model import default_model_dir
  from dynamo_jax.model import pythia
  model = dynamo_jax.load()
  sample = np.load(os.path.join(default_model_dir(), "test_sample.npy"))
  ids = jnp.asarray(sample[None, :128], jnp.int32)
  logits = pythia.forward(model.config, model.params, ids, all_heads=True)
  logits_PxNxV = jnp.transpose(logits[:N, 0, 64:], (1, 0, 2))
  history = jnp.asarray(sample[None, :64], jnp.int32)
  return (logits_PxNxV, history, jnp.array([HISTORY], jnp.int32),
          lookup_lib.device_table(model.cooc, N))


def _baseline_modules(rev):
  """(dynamo_sampler, cooc.lookup) of git revision `rev`: its dynamo_jax
  extracted to a temporary folder as package `dynamo_jax_baseline`."""
  root = pathlib.Path(__file__).resolve().parents[1]
  folder = pathlib.Path(tempfile.mkdtemp(prefix="dynamo_baseline_"))
  archive = subprocess.run(["git", "archive", rev, "dynamo_jax"], cwd=root,
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
  package = folder / "dynamo_jax_baseline"
  (folder / "dynamo_jax").rename(package)
  for path in package.rglob("*.py"):
    path.write_text(re.sub(r"\bdynamo_jax\b", "dynamo_jax_baseline",
                           path.read_text()))
  sys.path.insert(0, str(folder))
  return (importlib.import_module("dynamo_jax_baseline.decoding.dynamo_sampler"),
          importlib.import_module("dynamo_jax_baseline.cooc.lookup"))


def _bench_baseline(rev, step_logits, history, history_len, table, repeats):
  """This checkout's sampler and revision `rev`'s, calls alternating."""
  old_ds, old_lookup = _baseline_modules(rev)
  old_sample = jax.jit(old_ds.dynamo_sample,
                       static_argnames=old_ds.STATIC_ARGNAMES)
  old_table = old_lookup.DeviceTable(table.arrays)
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  temps = jnp.full((N,), TEMPERATURE, jnp.float32)
  rp, positions = jnp.float32(RP), len(step_logits)
  out = {"rev": rev, "commit": subprocess.run(
      ["git", "rev-parse", rev], capture_output=True, text=True,
      cwd=pathlib.Path(__file__).resolve().parents[1]).stdout.strip()}
  for name, new_cooc, old_cooc in (("no_cooc", None, None),
                                   ("cooc_table", table, old_table)):
    for eps_b in (0.0, 0.5, 1.0):
      runs = {side: (lambda i, f=f, c=c, e=jnp.float32(eps_b): f(
          keys, step_logits[i], history, history_len, c, n=N, k=K,
          temperature=temps, eps_b=e, repetition_penalty=rp,
          use_cooc=c is not None))
              for side, f, c in (("this", SAMPLE, new_cooc),
                                 ("baseline", old_sample, old_cooc))}
      times = {side: [] for side in runs}
      for side, run in runs.items():
        jax.block_until_ready(run(0))
      for i in range(repeats):
        for side in (("this", "baseline") if i % 2 else ("baseline", "this")):
          start = time.perf_counter()
          jax.block_until_ready(runs[side](i % positions))
          times[side].append(1e3 * (time.perf_counter() - start))
      out[f"{name}_eps_b_{eps_b}"] = {
          side: {"median_ms": round(statistics.median(t), 4),
                 "p10_ms": round(float(np.percentile(t, 10)), 4)}
          for side, t in times.items()}
  return out


def _bench_embedded(repeats, baseline=None, native_lookup=False):
  logits_PxNxV, history, history_len, table = _embedded_inputs()
  tables = [("cooc_table", table)]
  if native_lookup:  # the same arrays, read by kernels/cpu_cooc.cc
    tables.append(("cooc_table_native", lookup_lib.DeviceTable(
        table.arrays, lookup="native")))
  positions = logits_PxNxV.shape[0]
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  temps = jnp.full((N,), TEMPERATURE, jnp.float32)
  rp = jnp.float32(RP)

  def cycled_ms(fn):
    """Median and p10 over `repeats` calls, each on the next position."""
    jax.block_until_ready(fn(0))
    times = []
    for i in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(i % positions))
      times.append(1e3 * (time.perf_counter() - start))
    return (round(statistics.median(times), 4),
            round(float(np.percentile(times, 10)), 4))

  out = {"vocab": int(logits_PxNxV.shape[-1]), "positions": positions}
  # Sliced before timing: an eager slice inside the timed call is a dispatch
  # (tens of microseconds here) that a decode step never pays.
  step_logits = [logits_PxNxV[i:i + 1] for i in range(positions)]
  for name, cooc in [("no_cooc", None)] + tables:
    res = {"total_ms": {}, "total_p10_ms": {}, "m_mean": {}}
    for eps_b in (0.0, 0.5, 1.0):
      run = lambda i, c=cooc, e=jnp.float32(eps_b): SAMPLE(
          keys, step_logits[i], history, history_len, c, n=N, k=K,
          temperature=temps, eps_b=e, repetition_penalty=rp,
          use_cooc=c is not None)
      res["total_ms"][str(eps_b)], res["total_p10_ms"][str(eps_b)] = (
          cycled_ms(run))
      res["m_mean"][str(eps_b)] = float(np.mean(
          [int(run(i).m_B[0]) for i in range(positions)]))
    out[name] = res
  topk = jax.jit(lambda l: ds.topk_marginals(l, temps, history, history_len,
                                             k=K)[0])
  ids = [topk(logits_PxNxV[i:i + 1]) for i in range(positions)]
  for name, t in tables:
    key = "lookup_ms" + name[len("cooc_table"):]
    out[key] = {}
    for m in range(2, N + 1):
      lookup = jax.jit(lambda x, t, m=m: t.grid_weights(x[:, :m], 1.0))
      out[key][f"m{m}"] = cycled_ms(lambda i, t=t: lookup(ids[i], t))[0]
  if baseline is not None:
    out["baseline"] = _bench_baseline(baseline, step_logits, history,
                                      history_len, table, repeats)
  return out


def _machine():
  model = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      info = dict(line.split(":", 1) for line in f if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    model = (f"{info['model name']} (family {info['cpu family']}, model "
             f"{info['model']}, {info['cpu MHz']} MHz)")
  except (OSError, KeyError):
    pass
  return {"cpu": model, "cores": os.cpu_count(),
          "platform": platform.platform(), "jax": jax.__version__,
          "backend": jax.default_backend()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--skip-embedded", action="store_true",
                      help="skip the embedded model + real table case")
  parser.add_argument("--native-lookup", action="store_true",
                      help="also time the embedded case with the native "
                      "co-occurrence lookup (kernels/cpu_cooc.py), same "
                      "process, same table arrays")
  parser.add_argument("--baseline", metavar="REV",
                      help="also time git revision REV's sampler on the "
                           "embedded case, calls alternating with this one's")
  args = parser.parse_args()
  load_before = os.getloadavg()[0]
  results = {}
  for batch in args.batches:
    results[f"batch{batch}"] = {
        "no_cooc": _bench(batch, None, args.repeats),
        "cooc_standin": _bench(batch, FixedCooc.random(batch), args.repeats),
    }
  if not args.skip_embedded:
    results["embedded_model_batch1"] = _bench_embedded(
        args.repeats, args.baseline, args.native_lookup)
  print(json.dumps({
      "benchmark": "dynamo_sampler step",
      "setting": {"vocab": VOCAB, "k": K, "n": N, "history": HISTORY,
                  "temperature": TEMPERATURE, "repetition_penalty": RP,
                  "blur": True, "otsu": True, "keys": "one per row",
                  "repeats": args.repeats, "target_ms_batch1": 1.0,
                  "target_ms_embedded_table": 0.3},
      "cooc_standin": "fixed random [B,K..K] weight grids, ~50% zeros; "
                      "NOT the real table lookup",
      "machine": _machine(),
      "load_avg_1min": {"before": round(load_before, 2),
                        "after": round(os.getloadavg()[0], 2)},
      "results": results,
  }, indent=1))


if __name__ == "__main__":
  main()
