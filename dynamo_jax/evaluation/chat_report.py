"""The judged report of `eval chat`: each conversation (a question's turns at
one setting and seed) against the model's own AR conversation, per category.

A conversation record joins its turns: the judge's prompt is the question
(a multi-turn one as "[Turn 1]\\n...\\n\\n[Turn 2]\\n..."), the response is
the answers under the same turn labels; seconds, forward passes and tokens
are summed over the turns. PairwiseJudge asks every pair in both orders
(two orders that disagree are a tie; identical conversations, as eps_b 1
gives, are a tie without asking). The statistics are judging.summarize's,
per category and over all questions ("all"): wins / losses / ties of each
(mode, eps_b), win rate = wins / losses with a bootstrap interval, and
speed-ups over AR by wall clock (sum of AR's seconds / sum of the
setting's, each call generating max_new_tokens) and by tokens per forward
pass; the same-quality speed-up where the regression of win rate on
speed-up crosses 1.

Written into OUT: conversations.jsonl (one record per conversation, with
its outcome and the two verdicts), table.json, table.md, table.csv and,
with a judge, winrate_vs_speedup.png; each replaced atomically.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings

import numpy as np

from dynamo_jax.evaluation import judge_report, judging
from dynamo_jax.evaluation.quality import distinct_n
from dynamo_jax.fileio import atomic_write, atomic_write_text

ALL = "all"
FILES = ("conversations.jsonl", "table.json", "table.md", "table.csv",
         "winrate_vs_speedup.png")
CSV_FIELDS = ("category", "mode", "eps_b", "n", "wins", "losses", "ties",
              "win_rate", "win_rate_low", "win_rate_high", "win_score",
              "speedup_wall_clock", "speedup_tokens_per_pass",
              "tokens_per_pass")


def _labelled(texts: list[str]) -> str:
  if len(texts) == 1:
    return texts[0]
  return "\n\n".join(f"[Turn {t}]\n{x}" for t, x in enumerate(texts, 1))


def conversations(rows: list[dict], questions: list[dict]) -> list[dict]:
  """One record per (question, seed, mode, eps_b) from its turn rows, with
  the fields judging's functions read (prompt_id = the question's index)."""
  index = {q["question_id"]: i for i, q in enumerate(questions)}
  turns = {}
  for r in rows:
    turns.setdefault((r["question_id"], r["seed"], r["mode"], r["eps_b"]),
                     []).append(r)
  out = []
  for (qid, seed, mode, eps), group in turns.items():
    group.sort(key=lambda r: r["turn"])
    q = questions[index[qid]]
    passes = sum(r["forward_passes"] for r in group)
    tokens = sum(r["tokens_per_pass"] * r["forward_passes"] for r in group)
    out.append({
        "prompt_id": index[qid], "question_id": qid,
        "category": q["category"], "seed": seed, "mode": mode, "eps_b": eps,
        "prompt": _labelled(q["turns"]),
        "text": _labelled([r["text"] for r in group]),
        "token_ids": [t for r in group for t in r["answer_ids"]],
        "forward_passes": passes, "tokens_per_pass": tokens / max(passes, 1),
        "seconds": sum(r["seconds"] for r in group), "turns": len(group)})
  return out


def _scores(records: list[dict]) -> list[dict]:
  """summarize's per-record scores: distinct-n and repetition of the
  answers' tokens; no reference NLL (NaN, so no NLL columns)."""
  return [{"nll_sum": float("nan"), "nll_tokens": 0,
           **{f"distinct_{n}": distinct_n(r["token_ids"], n)
              for n in (1, 2, 3)},
           "repetition": judging.repetition_rate(r["token_ids"])}
          for r in records]


def summarize(records, outcomes, *, bootstrap: int, seed: int) -> dict:
  """{category: judging.summarize(...) of its records}, "all" first."""
  cats = [ALL] + sorted({r["category"] for r in records})
  scores = _scores(records)
  out = {}
  for cat in cats:
    idx = [i for i, r in enumerate(records) if cat in (ALL, r["category"])]
    sub = [records[i] for i in idx]
    with warnings.catch_warnings():  # NaN NLLs; all-empty answers' distinct-n
      warnings.simplefilter("ignore", RuntimeWarning)
      out[cat] = judging.summarize(
          sub, judging.baselines(sub), [scores[i] for i in idx],
          [outcomes[i] for i in idx], bootstrap=bootstrap, seed=seed)
  return out


def table_rows(categories: dict) -> list[dict]:
  """The CSV / markdown rows: every (category, mode, eps_b) group."""
  rows = []
  for cat, summary in categories.items():
    for g in summary["groups"]:
      interval = g.get("win_rate_interval") or [None, None]
      rows.append({"category": cat, **{k: g.get(k) for k in CSV_FIELDS[1:8]},
                   "win_rate_low": interval[0], "win_rate_high": interval[1],
                   **{k: g.get(k) for k in CSV_FIELDS[10:]}})
  return rows


def _fmt(value, spec=".3f") -> str:
  return "-" if value is None else format(value, spec)


def markdown(table: dict) -> str:
  """The table as markdown, then the same-quality speed-ups."""
  lines = [f"Chat evaluation: {table['questions']} questions, seeds "
           f"{table['seeds']}, judge: {table['judge_note']}", "",
           "| category | mode | eps_b | n | W / L / T | win rate W/L | 95% "
           "interval | (W+T/2)/n | wall-clock speed-up | tokens/pass | "
           "tokens/pass speed-up |", "|" + "---|" * 11]
  for r in table_rows(table["categories"]):
    wlt = ("-" if r["wins"] is None
           else f"{r['wins']} / {r['losses']} / {r['ties']}")
    ci = ("-" if r["win_rate_low"] is None else
          f"{r['win_rate_low']:.2f} to {r['win_rate_high']:.2f}")
    lines.append(
        f"| {r['category']} | {r['mode']} | {_fmt(r['eps_b'], '.2f')} | "
        f"{r['n']} | {wlt} | {_fmt(r['win_rate'])} | {ci} | "
        f"{_fmt(r['win_score'])} | {_fmt(r['speedup_wall_clock'], '.2f')} | "
        f"{_fmt(r['tokens_per_pass'], '.2f')} | "
        f"{_fmt(r['speedup_tokens_per_pass'], '.2f')} |")
  lines.append("")
  if table["judged"]:
    for cat, summary in table["categories"].items():
      for name, c in summary["same_quality_speedup"].get("dynamo", {}).items():
        point = ("undefined" if c["point"] is None else
                 f"{c['point']:.2f}" + (" (extrapolated)" if c["extrapolated"]
                                        else ""))
        lines.append(f"- {cat}: same-quality {name.replace('_', ' ')} "
                     f"speed-up {point}")
  return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, CSV_FIELDS, lineterminator="\n")
  writer.writeheader()
  for r in table_rows(table["categories"]):
    writer.writerow({k: "" if v is None else v for k, v in r.items()})
  return buffer.getvalue()


def plot(table: dict, path: str) -> None:
  """Win rate against each speed-up: DynaMo's eps_b points per category
  (joined in eps_b order), verified as a cross; "all" in black with its
  regression line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, (name, field) in zip(axes, judge_report.SPEEDUPS.items()):
    for cat, summary in table["categories"].items():
      color = "black" if cat == ALL else None
      pts = [(g[field], g["win_rate"]) for g in summary["groups"]
             if g["mode"] == "dynamo" and g["win_rate"] is not None
             and g[field] is not None]
      if pts:
        x, y = np.asarray(pts).T
        line = ax.plot(x, y, "o-" if cat != ALL else "o", color=color,
                       lw=1 if cat != ALL else 0, ms=4 if cat != ALL else 6,
                       label=cat)[0]
        color = line.get_color()
        if cat == ALL and np.ptp(x) > 0:
          xs = np.sort(x)
          ax.plot(xs, np.polyval(np.polyfit(x, y, 1), xs), "-", lw=1.5,
                  color=color, label="all: least-squares line")
      ver = [(g[field], g["win_rate"]) for g in summary["groups"]
             if g["mode"] == "verified" and g["win_rate"] is not None
             and g[field] is not None]
      for vx, vy in ver:
        ax.plot(vx, vy, "x", ms=8, color=color)
    ax.axhline(1.0, color="r", ls="--", lw=1, label="same quality as AR")
    ax.set_xlabel(f"{name.replace('_', ' ')} speed-up over AR")
    ax.set_ylabel("win rate vs AR (wins / losses)")
    ax.set_title("DynaMo (o) per eps_b, verified (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
  plt.close(fig)


def report(rows, questions, *, out_dir: str, judge=None, workers: int = 4,
           bootstrap: int = 1000, seed: int = 0, info: dict | None = None
           ) -> dict:
  """Judges the conversations of `rows` (chat_answers rows) when `judge` is
  given, writes the files of the module docstring, returns table.json's
  content."""
  records = conversations(rows, questions)
  base = judging.baselines(records)
  outcomes = ([None] * len(records) if judge is None
              else judging.judge_outcomes(records, base, judge, workers))
  table = judge_report.clean({
      **(info or {}), "questions": len(questions),
      "seeds": sorted({r["seed"] for r in records}),
      "judged": judge is not None,
      "judge": None if judge is None else {
          "url": judge.url, "model": judge.model, "requests": judge.requests,
          "cache_hits": judge.cache_hits, "cache_dir": judge.cache_dir},
      "judge_note": ("pairwise, both orders, against the model's own AR "
                     "answers; win rate = wins / losses" if judge is not None
                     else "none configured (--judge-url, --judge-model): "
                     "speed-ups only, no win rates"),
      "speedup_note": "wall_clock: sum of AR's seconds / the setting's, every "
                      "call generating max_new_tokens tokens; tokens_per_pass:"
                      " the setting's tokens per forward pass / AR's (1)",
      "categories": summarize(records, outcomes, bootstrap=bootstrap,
                              seed=seed)})
  os.makedirs(out_dir, exist_ok=True)
  atomic_write_text(os.path.join(out_dir, FILES[0]), "".join(
      json.dumps(judge_report.clean(
          {k: r[k] for k in ("question_id", "category", "seed", "mode",
                             "eps_b", "turns", "forward_passes",
                             "tokens_per_pass", "seconds", "prompt", "text")}
          | (o or {"outcome": None, "verdicts": None}))) + "\n"
      for r, o in zip(records, outcomes)))
  atomic_write_text(os.path.join(out_dir, FILES[1]),
                    json.dumps(table, indent=1))
  atomic_write_text(os.path.join(out_dir, FILES[2]), markdown(table))
  atomic_write_text(os.path.join(out_dir, FILES[3]), to_csv(table))
  if judge is not None:
    plot(table, os.path.join(out_dir, FILES[4]))
  return table
