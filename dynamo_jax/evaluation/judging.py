"""Scores of sampled continuations (generations.jsonl, written by `eval
completions`) against AR, per (mode, eps_b) group, and the paper's
same-quality speed-up. The baseline of every DynaMo / verified row is the
AR row at the same prompt_id and seed.

Per generation:
- nll: mean per-token NLL of the continuation under a reference model's
  head 1 (default: the generation's own model, scored on its own token
  ids; a `reference` model re-encodes the prompt and text with its own
  tokenizer, so its tokens are the reference's);
- distinct_1/2/3: unique n-grams / all n-grams of the continuation's tokens;
- repetition: the fraction of the continuation's tokens that lie inside a
  4-gram already seen earlier in the continuation (occurrences may
  overlap). 0 for text without a repeated 4-gram, near 1 for a loop; NaN
  for an empty continuation;
- speed-ups over its AR row: tokens_per_pass / AR's (AR's is 1), and AR's
  seconds / its seconds.
Per group (sums over the group's rows and their AR rows, so long rows weigh
more): tokens/pass speed-up = (sum tokens / sum passes) over AR's; wall-clock
speed-up = sum AR seconds / sum seconds; nll = sum NLL / sum tokens;
nll_ratio = AR's nll / the group's (> 1: more probable than AR's under the
reference, which repetition also buys: read it beside distinct-n).
Judged (a PairwiseJudge, both orders per pair): wins, losses, ties from the
DynaMo row's side; win_rate = wins / losses (the paper's), None when there
are no losses (undefined: such a group is left out of the regression);
win_score = (wins + ties / 2) / pairs beside it; win_rate_interval, a
percentile bootstrap interval of win_rate (rows resampled within the group,
seeded; win_rate_defined resamples had a loss). Identical texts are a tie
without asking the judge.
Same-quality speed-up: per non-AR mode, the least-squares line of the group
quality (win_rate with a judge; without one, nll_ratio, the offline axis)
on the group speed-up, solved for quality = 1.0; a percentile bootstrap
interval resamples rows within each group (with their AR rows), seeded; a
resampled group without a quality (no losses) is left out of that line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os

import numpy as np
from tqdm.auto import tqdm

from dynamo_jax.errors import DynamoError
from dynamo_jax.evaluation import judge_report

GENERATIONS_FILE = "generations.jsonl"
_FIELDS = {"prompt_id": int, "prompt": str, "seed": int, "mode": str,
           "text": str, "prompt_ids": list, "token_ids": list,
           "forward_passes": int, "tokens_per_pass": (int, float),
           "seconds": (int, float)}
_MODE_ORDER = {"ar": 0, "dynamo": 1, "verified": 2}
_INTERVAL = (2.5, 97.5)


def read_generations(path: str) -> list[dict]:
  """The rows of generations.jsonl, each checked for the fields used here."""
  if not os.path.isfile(path):
    raise DynamoError(f"{path} does not exist; write it with `python -m "
                      "dynamo_jax eval completions --out DIR`.")
  rows = []
  with open(path, encoding="utf-8") as fh:
    for number, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        raise DynamoError(f"{path}:{number} is not a JSON object.") from None
      bad = [k for k, kind in _FIELDS.items() if not isinstance(
          row.get(k) if isinstance(row, dict) else None, kind)]
      if bad or row["mode"] not in _MODE_ORDER or not row["prompt_ids"]:
        raise DynamoError(f"{path}:{number}: missing or invalid "
                          f"{', '.join(bad) or 'mode or prompt_ids'}; each "
                          "line needs the fields eval completions writes.")
      rows.append(row)
  if not rows:
    raise DynamoError(f"{path} holds no generations.")
  return rows


def baselines(rows: list[dict]) -> list[int | None]:
  """Per row, the index of the AR row at its (prompt_id, seed); None for AR
  rows. Raises when a row has no AR row or an AR row is doubled."""
  ar = {}
  for i, r in enumerate(rows):
    if r["mode"] == "ar":
      key = (r["prompt_id"], r["seed"])
      if key in ar:
        raise DynamoError(f"two AR rows at prompt_id {key[0]}, seed {key[1]};"
                          " judge one model's generations at a time.")
      ar[key] = i
  out = []
  for r in rows:
    key = (r["prompt_id"], r["seed"])
    if r["mode"] != "ar" and key not in ar:
      raise DynamoError(f"the {r['mode']} row at prompt_id {key[0]}, seed "
                        f"{key[1]} has no AR row at the same prompt and seed "
                        "(its baseline); generate with mode ar included.")
    out.append(None if r["mode"] == "ar" else ar[key])
  return out


def repetition_rate(tokens_X, n: int = 4) -> float:
  """Fraction of tokens inside an n-gram seen earlier (module docstring)."""
  toks = [int(t) for t in tokens_X]
  if not toks:
    return float("nan")
  seen, covered = set(), np.zeros(len(toks), bool)
  for i in range(len(toks) - n + 1):
    gram = tuple(toks[i:i + n])
    if gram in seen:
      covered[i:i + n] = True
    seen.add(gram)
  return float(covered.mean())


def reference_nll(rows: list[dict], reference: str | None = None,
                  batch_size: int = 16) -> list[np.ndarray]:
  """Per row, float64 [L]: the NLLs of its continuation tokens under head 1
  of `reference` (a checkpoint directory or hub id) or, when None, of the
  row's own model (its "model" field; null: the embedded default model)."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.api import load
  from dynamo_jax.evaluation.quality import continuation_nll
  out = [None] * len(rows)
  by_model = collections.defaultdict(list)
  for i, r in enumerate(rows):
    by_model[reference if reference is not None else r.get("model")].append(i)
  for name, indices in by_model.items():
    model = load(name)
    seqs = {}
    for i in indices:
      if reference is None:
        seqs[i] = (rows[i]["prompt_ids"], rows[i]["token_ids"])
      else:
        seqs[i] = (model.tokenizer.encode(rows[i]["prompt"]),
                   model.tokenizer.encode(rows[i]["text"]))
    by_prompt_len = collections.defaultdict(list)
    for i, (prompt, cont) in seqs.items():
      if cont:
        by_prompt_len[len(prompt)].append(i)
      else:
        out[i] = np.zeros(0)
    # Continuations right-padded to one length per prompt length, batches to
    # one size: one compile per prompt length; causal attention keeps the
    # padding from changing the NLL of the tokens before it.
    chunks = [(g[j:j + batch_size], max(len(seqs[k][1]) for k in g))
              for g in by_prompt_len.values()
              for j in range(0, len(g), batch_size)]
    for chunk, length in tqdm(chunks, desc="reference NLL", unit="batch",
                              disable=len(chunks) < 2):
      chunk = list(chunk) + [chunk[0]] * (batch_size - len(chunk))
      prompt_BxP = np.asarray([seqs[i][0] for i in chunk], np.int32)
      tokens_BxG = np.zeros((batch_size, length), np.int32)
      for b, i in enumerate(chunk):
        tokens_BxG[b, :len(seqs[i][1])] = seqs[i][1]
      nll_BxG = continuation_nll(model.config, model.params, prompt_BxP,
                                 tokens_BxG)
      for b, i in enumerate(chunk):
        out[i] = nll_BxG[b, :len(seqs[i][1])]
  return out


def offline_scores(rows: list[dict], nlls: list[np.ndarray]) -> list[dict]:
  """Per row: nll (mean per token), nll_sum, nll_tokens, distinct_1..3,
  repetition."""
  # pylint: disable=import-outside-toplevel
  from dynamo_jax.evaluation.quality import distinct_n
  return [{"nll": float(nll.mean()) if nll.size else float("nan"),
           "nll_sum": float(nll.sum()), "nll_tokens": int(nll.size),
           **{f"distinct_{n}": distinct_n(r["token_ids"], n) for n in (1, 2, 3)},
           "repetition": repetition_rate(r["token_ids"])}
          for r, nll in zip(rows, nlls)]


def judge_outcomes(rows: list[dict], base: list[int | None], judge,
                   workers: int = 4) -> list[dict | None]:
  """Per non-AR row, {"outcome": "win" | "loss" | "tie" (for the row, against
  its AR row), "verdicts": {"row_first": A/B/C, "ar_first": A/B/C} or None
  for identical texts}; None for AR rows."""
  side = {"a": "win", "b": "loss", "tie": "tie"}

  def one(i):
    row, ar = rows[i], rows[base[i]]
    if row["text"] == ar["text"]:
      return {"outcome": "tie", "verdicts": None}
    outcome, first, swapped = judge.judge_pair(row["prompt"], row["text"],
                                               ar["text"])
    return {"outcome": side[outcome],
            "verdicts": {"row_first": first, "ar_first": swapped}}

  out = [None] * len(rows)
  todo = [i for i, b in enumerate(base) if b is not None]
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    futures = {pool.submit(one, i): i for i in todo}
    for future in tqdm(concurrent.futures.as_completed(futures),
                       total=len(todo), desc="judging", unit="pair"):
      out[futures[future]] = future.result()
  finally:  # on an error, pairs not started are dropped, started ones finish
    pool.shutdown(wait=True, cancel_futures=True)
  return out


def _pair_table(rows, base, scores, outcomes, idx) -> dict[str, np.ndarray]:
  """Per-row quantities of rows `idx` and their AR rows, summed by groups."""
  def col(key, rows_idx):
    return np.asarray([rows[i][key] for i in rows_idx], np.float64)
  ar_idx = [base[i] if base[i] is not None else i for i in idx]
  t = {"passes": col("forward_passes", idx), "seconds": col("seconds", idx),
       "ar_passes": col("forward_passes", ar_idx),
       "ar_seconds": col("seconds", ar_idx),
       "nll_sum": np.asarray([scores[i]["nll_sum"] for i in idx]),
       "ntok": np.asarray([scores[i]["nll_tokens"] for i in idx], np.float64),
       "ar_nll_sum": np.asarray([scores[i]["nll_sum"] for i in ar_idx]),
       "ar_ntok": np.asarray([scores[i]["nll_tokens"] for i in ar_idx],
                             np.float64)}
  t["tokens"] = col("tokens_per_pass", idx) * t["passes"]
  t["ar_tokens"] = col("tokens_per_pass", ar_idx) * t["ar_passes"]
  got = [(outcomes[i] or {}).get("outcome") for i in idx]
  for name in ("win", "loss", "tie"):
    t[name] = np.asarray([g == name for g in got], np.float64)
  return t


def _group_values(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Group statistics from sums over rows (arrays: one per resample)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    nll, ar_nll = s["nll_sum"] / s["ntok"], s["ar_nll_sum"] / s["ar_ntok"]
    n = s["win"] + s["loss"] + s["tie"]
    return {
        "tokens_per_pass": s["tokens"] / s["passes"],
        "speedup_tokens_per_pass": (s["tokens"] / s["passes"])
                                   / (s["ar_tokens"] / s["ar_passes"]),
        "speedup_wall_clock": s["ar_seconds"] / s["seconds"],
        "win_rate": np.where(s["loss"] > 0, s["win"] / s["loss"], np.nan),
        "win_score": (s["win"] + s["tie"] / 2) / n,
        "nll": nll, "nll_ratio": ar_nll / nll}


def crossing(x, y, level: float = 1.0) -> float | None:
  """Where the least-squares line of y on x reaches `level` (finite points
  only); None with fewer than two distinct x or a flat line."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < 2 or np.ptp(x) == 0:
    return None
  slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
  if slope == 0:
    return None
  return float(x.mean() + (level - y.mean()) / slope)


def group_keys(rows: list[dict]) -> list[tuple[str, float | None]]:
  """(mode, eps_b) of every group, AR first, then by mode and eps_b."""
  return sorted({(r["mode"], r.get("eps_b")) for r in rows},
                key=lambda k: (_MODE_ORDER[k[0]], -1 if k[1] is None else k[1]))


def summarize(rows, base, scores, outcomes, *, bootstrap: int = 1000,
              seed: int = 0) -> dict:
  """{"quality_axis", "groups": [...], "same_quality_speedup": {mode: {
  "tokens_per_pass" | "wall_clock": {"point", "interval", "defined",
  "extrapolated"}}}} (definitions in the module docstring), JSON-able:
  undefined values (a win rate without losses) are None."""
  judged = any(o is not None for o in outcomes)
  axis = "win_rate" if judged else "nll_ratio"
  rng = np.random.default_rng(seed)
  groups, samples = [], {}
  for key in group_keys(rows):
    idx = [i for i, r in enumerate(rows) if (r["mode"], r.get("eps_b")) == key]
    table = _pair_table(rows, base, scores, outcomes, idx)
    values = _group_values({k: v.sum() for k, v in table.items()})
    g = {"mode": key[0], "eps_b": key[1], "n": len(idx),
         **{k: float(v) for k, v in values.items()}}
    for name, count in (("wins", "win"), ("losses", "loss"), ("ties", "tie")):
      g[name] = int(table[count].sum())
    for k in ("distinct_1", "distinct_2", "distinct_3", "repetition"):
      g[k] = float(np.nanmean([scores[i][k] for i in idx]))
    if key[0] != "ar":
      draw = rng.integers(0, len(idx), size=(bootstrap, len(idx)))
      samples[key] = _group_values({k: v[draw].sum(1) for k, v in table.items()})
      rates = samples[key]["win_rate"][np.isfinite(samples[key]["win_rate"])]
      g["win_rate_interval"] = (list(np.percentile(rates, _INTERVAL))
                                if rates.size and judged else None)
      g["win_rate_defined"] = int(rates.size) if judged else None
    if key[0] == "ar" or not judged:
      for k in ("wins", "losses", "ties", "win_rate", "win_score",
                "win_rate_interval", "win_rate_defined"):
        g[k] = None
    groups.append(g)
  result = {}
  for mode in sorted({k[0] for k in samples}, key=_MODE_ORDER.get):  # not AR
    mine = [g for g in groups if g["mode"] == mode]
    keys = [(g["mode"], g["eps_b"]) for g in mine]
    result[mode] = {}
    for name, field in judge_report.SPEEDUPS.items():
      x = [g[field] for g in mine]
      y = [np.nan if g[axis] is None else g[axis] for g in mine]
      point = crossing(x, y)
      boot = [crossing([samples[k][field][b] for k in keys],
                       [samples[k][axis][b] for k in keys])
              for b in range(bootstrap)]
      boot = [c for c in boot if c is not None]
      used = [xi for xi, yi in zip(x, y) if np.isfinite(xi) and np.isfinite(yi)]
      result[mode][name] = {
          "point": point, "defined": len(boot),
          "interval": (list(np.percentile(boot, _INTERVAL)) if boot else None),
          "extrapolated": (None if point is None
                           else not min(used) <= point <= max(used))}
  return judge_report.clean({
      "quality_axis": axis, "groups": groups, "same_quality_speedup": result,
      "bootstrap": {"resamples": bootstrap, "seed": seed,
                    "percentiles": list(_INTERVAL)}})


def row_scores(rows, base, scores, outcomes) -> list[dict]:
  """The scores.jsonl records."""
  out = []
  for i, r in enumerate(rows):
    a = rows[base[i]] if base[i] is not None else r
    out.append({k: r.get(k) for k in ("prompt_id", "seed", "mode", "eps_b",
                                      "model", "tokens_per_pass")}
               | {"tokens": len(r["token_ids"]),
                  "speedup_tokens_per_pass": r["tokens_per_pass"]
                  / a["tokens_per_pass"],
                  "speedup_wall_clock": (a["seconds"] / r["seconds"]
                                         if r["seconds"] else None)}
               | scores[i] | (outcomes[i] or {"outcome": None, "verdicts": None}))
  return out


def judge_generations(path: str, out_dir: str, *, reference: str | None = None,
                      judge=None, bootstrap: int = 1000, seed: int = 0,
                      workers: int = 4) -> dict:
  """Scores `path` (generations.jsonl) and writes scores.jsonl, summary.json,
  summary.md and quality_vs_speedup.png into `out_dir` (replacing them);
  returns the summary. Without `judge` the quality axis is offline."""
  rows = read_generations(path)
  base = baselines(rows)
  scores = offline_scores(rows, reference_nll(rows, reference))
  outcomes = ([None] * len(rows) if judge is None
              else judge_outcomes(rows, base, judge, workers))
  summary = {"generations": os.path.abspath(path), "rows": len(rows),
             "reference": reference or "each generation's own model (head 1)",
             "judge": None if judge is None else {
                 "url": judge.url, "model": judge.model,
                 "requests": judge.requests, "cache_hits": judge.cache_hits,
                 "cache_dir": judge.cache_dir}}
  summary |= summarize(rows, base, scores, outcomes, bootstrap=bootstrap,
                       seed=seed)
  summary["quality_axis_note"] = (
      "pairwise LLM judge against AR, win rate = wins / losses"
      if judge is not None else "no judge configured (--judge-url, "
      "--judge-model): offline NLL ratio, AR's per-token NLL / the row's, "
      "under the reference model")
  summary = judge_report.clean(summary)
  judge_report.write_outputs(out_dir, summary, judge_report.clean(
      row_scores(rows, base, scores, outcomes)))
  return summary
