"""The notebooks run: each one's code cells are executed in order, in one
namespace, at the small sizes their SMOKE switch selects, and what they
compute is checked where it can be exactly (eps_b = 1 is plain AR)."""

import csv
import json
import math
import os

import matplotlib
import numpy as np
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")


def run_notebook(name, env):
  with open(os.path.join(NOTEBOOKS, name)) as fh:
    nb = json.load(fh)
  namespace = {"__name__": "__notebook__"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    for cell in nb["cells"]:
      if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), name, "exec"), namespace)  # pylint: disable=exec-used
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return namespace


def test_dynamo_tables_notebook(tmp_path):
  matplotlib.use("Agg")
  ns = run_notebook("dynamo_tables.ipynb", smoke_env(tmp_path))
  ppl = ns["ppl"]
  for key in ("ppl_1", "ppl_2", "ppl_3", "ppl_1:2", "ppl_1:3"):
    assert math.isfinite(ppl[key]) and ppl[key] > 1
  assert ppl["ppl_1"] < ppl["ppl_2"] < ppl["ppl_3"]  # farther heads are worse
  rows = {a["variant"]: a for a in ns["ablation"]}
  assert set(rows) == {"Algorithm 1 (all on)", "- CO (no table)", "- AT (no Otsu)",
                       "- G-3 (no blur)", "alpha 0.5", "alpha 2", "eps_b 1 (= AR)"}
  ar_like = rows["eps_b 1 (= AR)"]
  assert ar_like["tokens_per_pass"] == 1.0
  assert ar_like["nll_ratio"] == 1.0 and ar_like["distinct_2_ratio"] == 1.0
  for row in rows.values():
    assert 1.0 <= row["tokens_per_pass"] <= 3.0
  assert len(ns["report"]["sweep"]) == 4  # 2 eps_b x (table, no table)
  for f in ("tables.md", "bench.json", "eps_b_sweep.json", "eps_b_sweep.png",
            "eps_b_sweep.csv", "table9_ablation.csv", "table9_ablation.md"):
    assert os.path.getsize(tmp_path / f) > 0
  table9 = read_csv(tmp_path / "table9_ablation.csv")
  assert [r["variant"] for r in table9] == [a["variant"] for a in ns["ablation"]]
  assert float(table9[-1]["nll_ratio"]) == 1.0  # eps_b 1 (= AR)


def smoke_env(tmp_path, **extra):
  """SMOKE sizes on the embedded model, outputs into tmp_path, no judge."""
  return {"DYNAMO_NOTEBOOK_SMOKE": "1", "DYNAMO_NOTEBOOK_OUT": str(tmp_path),
          "DYNAMO_MODEL": "", "DYNAMO_TOKENS": "", **extra}


def read_csv(path):
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh))


def assert_files(tmp_path, names):
  for f in names:
    assert os.path.getsize(tmp_path / f) > 0, f


def test_table2_notebook(tmp_path):
  matplotlib.use("Agg")
  ns = run_notebook("table2_perplexity.ipynb", smoke_env(tmp_path))
  by_eps = {r["eps_b"]: r for r in ns["results"]}
  assert sorted(by_eps) == [0.0, 0.5, 1.0]
  n = ns["config"].num_token_heads
  # eps_b 1 is plain AR: PPL_d is PPL_1 and every pass emits one token.
  assert by_eps[1.0]["ppl_d"] == pytest.approx(by_eps[1.0]["ppl_1"], rel=1e-12)
  assert by_eps[1.0]["tokens_per_pass_d"] == 1.0
  assert 1.0 < by_eps[0.5]["tokens_per_pass_d"] < by_eps[0.0]["tokens_per_pass_d"] <= n
  for r in ns["results"]:  # the static perplexities do not depend on eps_b
    for key in ("ppl_1", "ppl_2", "ppl_3", "ppl_1:2", "ppl_1:3"):
      assert r[key] == by_eps[1.0][key] and math.isfinite(r[key])
  rows = read_csv(tmp_path / "table2_perplexity.csv")
  assert len(rows) == 3 + 2
  assert float(rows[2]["PPL_d"]) == pytest.approx(by_eps[1.0]["ppl_d"])
  paper = {r["model"]: r for r in rows if r["model"].startswith("paper:")}
  assert paper["paper: DynaMo-77M-T3 (Pile)"]["PPL_1:3"] == "81.2"
  assert paper["paper: DynaMo-7.3B-T3 (Pile)"]["PPL_1"] == "6.5"
  assert paper["paper: DynaMo-7.3B-T3 (Pile)"]["PPL_d"] == ""  # the paper has none
  assert_files(tmp_path, ["table2_perplexity.csv", "table2_perplexity.md",
                          "table2_ppl_d.png"])


def test_table4_notebook(tmp_path):
  matplotlib.use("Agg")
  ns = run_notebook("table4_speedup.ipynb", smoke_env(tmp_path))
  table, dyn = ns["table"], ns["dyn"]
  (row,) = table["rows"]
  assert row["model"] == "dynamo-77m-t3" and table["kind"] == "projection"
  assert round(row["overhead_pct"], 2) == row["paper_overhead_pct"] == 8.95
  assert row["tokens_per_pass"] == dyn["tokens_per_pass"]  # the measured one
  assert row["projected_speedup"] == pytest.approx(
      row["tokens_per_pass"] / row["pass_price"], rel=1e-12)
  assert 1.0 <= dyn["tokens_per_pass"] <= 3.0 and dyn["speedup_vs_ar"] > 0
  rows = read_csv(tmp_path / "table4_speedup.csv")
  assert [r["kind"] for r in rows] == ["projection", "measured (wall clock)"]
  assert float(rows[1]["speed-up"]) == dyn["speedup_vs_ar"]
  text = (tmp_path / "table4_speedup.md").read_text()
  assert "x (projection)" in text and "x (measured)" in text
  for line in text.splitlines():  # no projected number without its label
    if line.startswith("| dynamo-77m-t3"):
      assert "(projection)" in line
  assert_files(tmp_path, ["table4_speedup.csv", "table4_speedup.md",
                          "table4_speedup.json", "table4_speedup.png"])


def test_fig5_notebook(tmp_path):
  matplotlib.use("Agg")
  ns = run_notebook("fig5_tokens_per_pass.ipynb", smoke_env(tmp_path))
  counts, passes = ns["counts"], ns["passes"]
  n, b, g = ns["n"], ns["rows"].shape[0], ns["NEW_TOKENS"]
  for e, c in counts.items():
    assert c.sum() == passes[e]  # one m per pass a row was decoding in
    emitted = int((np.arange(1, n + 1) * c).sum())
    assert b * g <= emitted < b * (g + n)  # a row's last pass may overshoot
  assert counts[1.0].tolist() == [b * g] + [0] * (n - 1)  # eps_b 1: AR
  assert counts[0.0][:-1].sum() == 0  # eps_b 0: always n
  rows = read_csv(tmp_path / "fig5_tokens_per_pass.csv")
  assert [int(r["passes"]) for r in rows] == [passes[e] for e in ns["EPS_B"]]
  assert [int(r["m=1"]) for r in rows] == [int(counts[e][0]) for e in ns["EPS_B"]]
  assert_files(tmp_path, ["fig5_tokens_per_pass.csv", "fig5_tokens_per_pass.md",
                          "fig5_tokens_per_pass.png"])


def test_winrate_notebook(tmp_path):
  matplotlib.use("Agg")
  ns = run_notebook("winrate_speedup.ipynb", smoke_env(
      tmp_path, OPENAI_API_KEY="", DYNAMO_JUDGE_URL="", DYNAMO_JUDGE_MODEL=""))
  summary = ns["summary"]
  assert summary["quality_axis"] == "nll_ratio" and summary["judge"] is None
  groups = {(g["mode"], g["eps_b"]): g for g in summary["groups"]}
  assert set(groups) == {("ar", None)} | {("dynamo", e) for e in ns["GRID"]}
  assert groups[("ar", None)]["speedup_tokens_per_pass"] == 1.0
  # eps_b 1 emits AR's exact tokens at the same seeds: quality ratio 1.
  assert groups[("dynamo", 1.0)]["speedup_tokens_per_pass"] == 1.0
  assert groups[("dynamo", 1.0)]["nll_ratio"] == pytest.approx(1.0, rel=1e-12)
  assert groups[("dynamo", 0.0)]["speedup_tokens_per_pass"] > 1.0
  with open(ns["generations"]) as fh:
    assert sum(1 for _ in fh) == len(ns["PROMPT_LIST"]) * ns["SEEDS"] * (len(ns["GRID"]) + 1)
  rows = read_csv(tmp_path / "winrate_speedup.csv")
  assert len(rows) == len(groups)
  assert "offline NLL ratio" in (tmp_path / "winrate_speedup.md").read_text()
  assert_files(tmp_path, ["winrate_speedup.csv", "winrate_speedup.md",
                          "winrate_same_quality_speedup.csv",
                          "winrate_judge_smoke/quality_vs_speedup.png",
                          "winrate_judge_smoke/summary.md"])


def test_notebooks_are_valid_and_documented():
  """nbformat 4 JSON; the first code cell reads the model argument and the
  SMOKE switch; the first cell says how to run it for a real model."""
  names = sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
  assert set(names) >= {"dynamo_tables.ipynb", "table2_perplexity.ipynb",
                        "table4_speedup.ipynb", "fig5_tokens_per_pass.ipynb",
                        "winrate_speedup.ipynb"}
  for name in names:
    with open(os.path.join(NOTEBOOKS, name)) as fh:
      nb = json.load(fh)
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
      assert cell["cell_type"] in ("markdown", "code") and "metadata" in cell
      if cell["cell_type"] == "code":
        assert cell["outputs"] == [] and cell["execution_count"] is None
    assert nb["cells"][0]["cell_type"] == "markdown"
    intro = "".join(nb["cells"][0]["source"])
    assert "DYNAMO_MODEL=" in intro and "Needs" in intro, name
    first_code = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for var in ("DYNAMO_MODEL", "DYNAMO_NOTEBOOK_OUT", "DYNAMO_NOTEBOOK_SMOKE"):
      assert var in first_code, (name, var)
