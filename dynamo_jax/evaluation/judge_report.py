"""The judged summary written out: scores.jsonl, summary.json, summary.md and
quality_vs_speedup.png, each into a temp sibling renamed onto its name (a
re-run replaces them; an interrupted one leaves the previous files whole).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dynamo_jax.fileio import atomic_write, atomic_write_text

# Group field of each speed-up axis.
SPEEDUPS = {"tokens_per_pass": "speedup_tokens_per_pass",
            "wall_clock": "speedup_wall_clock"}


def clean(value):
  """NaN / inf -> None (JSON has neither); numpy scalars -> Python."""
  if isinstance(value, dict):
    return {k: clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [clean(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def _fmt(value, spec=".3f") -> str:
  return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
  """The summary as a markdown table and the same-quality speed-ups."""
  note = summary.get("quality_axis_note", summary["quality_axis"])
  lines = [f"Quality axis: {note}", "",
           "| mode | eps_b | n | tokens/pass | wall-clock speed-up | W / L / T "
           "| win rate W/L | (W+T/2)/n | NLL | NLL ratio AR/row | distinct-1 "
           "| distinct-2 | distinct-3 | repetition |",
           "|" + "---|" * 14]
  for g in summary["groups"]:
    wlt = ("-" if g["wins"] is None
           else f"{g['wins']} / {g['losses']} / {g['ties']}")
    lines.append(
        f"| {g['mode']} | {_fmt(g['eps_b'], '.2f')} | {g['n']} | "
        f"{_fmt(g['tokens_per_pass'], '.2f')} | "
        f"{_fmt(g['speedup_wall_clock'], '.2f')} | {wlt} | "
        f"{_fmt(g['win_rate'])} | {_fmt(g['win_score'])} | {_fmt(g['nll'])} | "
        f"{_fmt(g['nll_ratio'])} | " + " | ".join(_fmt(g[k]) for k in (
            "distinct_1", "distinct_2", "distinct_3", "repetition")) + " |")
  lines.append("")
  for mode, axes in summary["same_quality_speedup"].items():
    for name, c in axes.items():
      ci = ("" if not c["interval"] else
            " (95% bootstrap interval {:.2f} to {:.2f}, {} of {} resamples "
            "defined)".format(*c["interval"], c["defined"],
                              summary["bootstrap"]["resamples"]))
      where = " extrapolated" if c["extrapolated"] else ""
      point = ("undefined (fewer than two groups with a quality, or a flat "
               "line)" if c["point"] is None else f"{c['point']:.2f}")
      lines.append(f"- {mode}: same-quality {name} speed-up {point}{where}{ci}")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
  """Quality against both speed-ups, each non-AR mode with its line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  axis = summary["quality_axis"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, (name, field) in zip(axes, SPEEDUPS.items()):
    for mode, crossings in summary["same_quality_speedup"].items():
      pts = [(g[field], g[axis]) for g in summary["groups"]
             if g["mode"] == mode and g[axis] is not None and g[field] is not None]
      if not pts:
        continue
      x, y = np.asarray(pts).T
      color = ax.plot(x, y, "o", label=mode)[0].get_color()
      if np.ptp(x) > 0:
        ax.plot(np.sort(x), np.polyval(np.polyfit(x, y, 1), np.sort(x)), "-",
                lw=1, color=color)
      c = crossings[name]
      if c["point"] is not None:
        ax.axvline(c["point"], ls=":", lw=1, color=color,
                   label=f"{mode}: same quality at {c['point']:.2f}x")
      if c["interval"]:
        ax.axvspan(*c["interval"], alpha=0.1, color=color)
    ax.axhline(1.0, color="r", ls="--", lw=1, label="same quality as AR")
    ax.set_xlabel(f"{name.replace('_', ' ')} speed-up over AR")
    ax.set_ylabel({"win_rate": "win rate vs AR (wins / losses)",
                   "nll_ratio": "NLL ratio AR / row (offline)"}[axis])
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
  plt.close(fig)


def write_outputs(out_dir: str, summary: dict, records: list[dict]) -> None:
  """The four files, from a cleaned summary and scores.jsonl records."""
  os.makedirs(out_dir, exist_ok=True)
  atomic_write_text(os.path.join(out_dir, "scores.jsonl"),
                    "".join(json.dumps(r) + "\n" for r in records))
  atomic_write_text(os.path.join(out_dir, "summary.json"),
                    json.dumps(summary, indent=1))
  atomic_write_text(os.path.join(out_dir, "summary.md"), markdown(summary))
  plot(summary, os.path.join(out_dir, "quality_vs_speedup.png"))
