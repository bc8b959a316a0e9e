"""Accelerator peak figures from vendor data sheets, by `device_kind`.

Used by the benchmarks that compare a measurement with what the device could
do: MFU (experiments/bench_train.py, peak dense bf16 FLOP/s) and the HBM
bound of a decode pass (passes.py for experiments/bench_step.py, peak memory
bandwidth).
An unknown device gives None, never a guess.

Entries match when all their lower-case substrings occur in the lower-cased
device_kind; the first match wins, so specific entries come first. Device
kinds seen in practice: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
"NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "TPU v4",
"TPU v5 lite" (v5e), "TPU v5" (v5p on a TPU VM; "TPU v5p" under Pathways),
"TPU v6 lite". A kind that a substring would confuse is listed exactly.
"""

from __future__ import annotations

Table = tuple[tuple[tuple[str, ...], float], ...]

# Peak memory bandwidth, GB/s (1e9 bytes/s).
BANDWIDTH_GBS: Table = (
    (("h100", "pcie"), 2000.0),
    (("h100", "80gb hbm3"), 3350.0),
    (("h100", "sxm"), 3350.0),
    (("h200",), 4800.0),
    (("a100", "80gb", "pcie"), 1935.0),
    (("a100", "80gb"), 2039.0),
    (("a100", "40gb"), 1555.0),
    (("tpu v5 lite",), 819.0),
    (("tpu v5e",), 819.0),
    (("tpu v5p",), 2765.0),
    (("tpu v6 lite",), 1640.0),
    (("tpu v6e",), 1640.0),
    (("tpu v4",), 1200.0),
)
BANDWIDTH_EXACT_GBS = {"tpu v5": 2765.0}  # v5p on a TPU VM

# Peak dense bf16 FLOP/s.
PEAK_BF16_FLOPS: Table = (
    (("h100",), 989e12),
    (("h200",), 989e12),
    (("a100",), 312e12),
    (("tpu v4",), 275e12),
    (("tpu v5 lite",), 197e12),
    (("tpu v5e",), 197e12),
    (("tpu v5p",), 459e12),
)
PEAK_BF16_EXACT_FLOPS = {"tpu v5": 459e12}  # v5p on a TPU VM


def lookup(kind: str, table: Table, exact: dict[str, float]):
  """(value, the entry that matched) or (None, None) for an unknown kind."""
  low = kind.lower().strip()
  if low in exact:
    return exact[low], f"device_kind == {low!r}"
  for needles, value in table:
    if all(s in low for s in needles):
      return value, f"device_kind contains {' + '.join(needles)}"
  return None, None


def peak_bf16_flops(kind: str) -> float | None:
  return lookup(kind, PEAK_BF16_FLOPS, PEAK_BF16_EXACT_FLOPS)[0]
