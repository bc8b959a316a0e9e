"""The notebooks run: each one's code cells are executed in order, in one
namespace, at the small sizes their SMOKE switch selects, and what they
compute is checked where it can be exactly (eps_b = 1 is plain AR)."""

import json
import math
import os

import matplotlib
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
  ns = run_notebook("dynamo_tables.ipynb", {
      "DYNAMO_NOTEBOOK_SMOKE": "1", "DYNAMO_NOTEBOOK_OUT": str(tmp_path)})
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
  for f in ("tables.md", "bench.json", "eps_b_sweep.json", "eps_b_sweep.png"):
    assert os.path.getsize(tmp_path / f) > 0
