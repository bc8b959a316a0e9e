"""Sorted count tables ("runs"): build, merge, spill to disk, prune.

A run is a pair (keys uint64 [R] strictly increasing, counts int64 [R]).
Counting produces one run per chunk; `RunStore` keeps the runs of one n-gram
order within a memory budget by merging them and, when even the merged run is
too large, writing it to disk. The final k-way merge streams over all runs in
blocks, so counting is exact whatever the budget: runs are never pruned
before the final merge, where `min_count` is applied to total counts.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from dynamo_jax import fileio

_SPILL_NAME = "dynamo-cooc-spill"

Run = tuple[np.ndarray, np.ndarray]
# Entries gathered per merge step, over all runs; bounds merge temporaries.
_MERGE_STEP = 1 << 22


def run_bytes(run: Run) -> int:
  return run[0].nbytes + run[1].nbytes


def from_keys(keys_N: np.ndarray) -> Run:
  """Sorts keys in place and returns the run of distinct keys with counts."""
  keys_N.sort()
  n = keys_N.shape[0]
  if n == 0:
    return keys_N, np.zeros(0, np.int64)
  starts = np.flatnonzero(keys_N[1:] != keys_N[:-1]) + 1
  starts = np.concatenate([[0], starts])
  counts = np.diff(np.append(starts, n))
  return keys_N[starts], counts.astype(np.int64, copy=False)


def _merge_pieces(pieces: list[Run]) -> Run:
  """One run from runs that may share keys (each run alone is distinct)."""
  pieces = [p for p in pieces if p[0].shape[0]]
  if not pieces:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  if len(pieces) == 1:
    return np.array(pieces[0][0]), np.array(pieces[0][1])
  keys = np.concatenate([p[0] for p in pieces])
  counts = np.concatenate([p[1] for p in pieces])
  # A stable sort of concatenated sorted runs is a merge (timsort finds the
  # runs), several times faster than sorting unordered keys.
  order = np.argsort(keys, kind="stable")
  keys, counts = keys[order], counts[order]
  starts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
  starts = np.concatenate([[0], starts])
  return keys[starts], np.add.reduceat(counts, starts)


class DiskRun:
  """A run written to two .npy files, read in blocks by positioned reads.

  Not memory-mapped: mapped pages would count as resident memory until
  the whole merge is done.
  """

  def __init__(self, path: str, run: Run | None = None):
    """Writes `run` to path.keys.npy and path.counts.npy, or, with no run,
    opens the pair already there (another process's counts)."""
    self.path = path
    if run is not None:
      np.save(path + ".keys.npy", run[0])
      np.save(path + ".counts.npy", run[1])
    self._offsets = {}
    sizes = {}
    for name, dtype in (("keys", np.uint64), ("counts", np.int64)):
      with open(f"{path}.{name}.npy", "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, stored = np.lib.format.read_array_header_1_0(f)
        if len(shape) != 1 or stored != dtype:
          raise ValueError(f"{path}.{name}.npy holds {stored} {shape}, not "
                           f"a 1-D {np.dtype(dtype)} run.")
        sizes[name] = shape[0]
        self._offsets[name] = f.tell()
    if sizes["keys"] != sizes["counts"]:
      raise ValueError(f"{path}: {sizes['keys']} keys but {sizes['counts']} "
                       "counts.")
    self.size = sizes["keys"]

  def _read(self, name: str, lo: int, hi: int, dtype) -> np.ndarray:
    with open(f"{self.path}.{name}.npy", "rb") as f:
      f.seek(self._offsets[name] + lo * 8)
      return np.fromfile(f, dtype, hi - lo)

  def key(self, i: int) -> np.uint64:
    return self._read("keys", i, i + 1, np.uint64)[0]

  def read(self, lo: int, hi: int) -> Run:
    return (self._read("keys", lo, hi, np.uint64),
            self._read("counts", lo, hi, np.int64))

  def delete(self) -> None:
    for name in ("keys", "counts"):
      if os.path.exists(f"{self.path}.{name}.npy"):
        os.remove(f"{self.path}.{name}.npy")


class _MemoryRun:
  """The `DiskRun` reading interface over arrays in memory."""

  def __init__(self, run: Run):
    self.run = run
    self.size = run[0].shape[0]

  def key(self, i: int) -> np.uint64:
    return self.run[0][i]

  def read(self, lo: int, hi: int) -> Run:
    return self.run[0][lo:hi], self.run[1][lo:hi]


def merge(runs: list, min_count: int = 1) -> Run:
  """Sums the counts of equal keys over runs, keeping totals >= min_count.

  `runs` are (keys, counts) pairs or `DiskRun`s. Streams over them in steps
  of about `_MERGE_STEP` entries: each step takes, from every run, all keys
  up to the smallest last key of the runs' next blocks, so every key's total
  count is complete when it is pruned.
  """
  runs = [r if isinstance(r, DiskRun) else _MemoryRun(r) for r in runs]
  runs = [r for r in runs if r.size]
  pos = [0] * len(runs)
  block = max(1 << 16, _MERGE_STEP // max(1, len(runs)))
  out_keys, out_counts = [], []
  while True:
    live = [i for i, r in enumerate(runs) if pos[i] < r.size]
    if not live:
      break
    ends = {i: min(pos[i] + block, runs[i].size) for i in live}
    bound = min(runs[i].key(ends[i] - 1) for i in live)
    pieces = []
    for i in live:
      keys, counts = runs[i].read(pos[i], ends[i])
      stop = int(np.searchsorted(keys, bound, "right"))
      pieces.append((keys[:stop], counts[:stop]))
      pos[i] += stop
    keys, counts = _merge_pieces(pieces)
    if min_count > 1:
      keep = counts >= min_count
      keys, counts = keys[keep], counts[keep]
    out_keys.append(keys)
    out_counts.append(counts)
  if not out_keys:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  return np.concatenate(out_keys), np.concatenate(out_counts)


class RunStore:
  """The runs of one n-gram order, held within `budget_bytes` of memory.

  When the runs in memory exceed the budget they are merged into one; if that
  run still takes more than half the budget it is written to `spill_dir`
  (removed by `close`) and read back in blocks by the final merge. Peak
  memory is about twice the budget (a merge's inputs and output).
  """

  def __init__(self, budget_bytes: int, spill_dir: str | None = None):
    self.budget_bytes = budget_bytes
    self._spill_parent = spill_dir
    self._spill_dir = None
    self._memory: list[Run] = []
    self._disk: list[DiskRun] = []
    self.merges = 0
    self.spills = 0

  @property
  def memory_bytes(self) -> int:
    return sum(run_bytes(r) for r in self._memory)

  def add(self, run: Run) -> None:
    self._memory.append(run)
    if self.memory_bytes <= self.budget_bytes:
      return
    merged = merge(self._memory)
    self.merges += 1
    self._memory = []
    if run_bytes(merged) > self.budget_bytes // 2:
      self._spill(merged)  # merging again would barely shrink it
    else:
      self._memory = [merged]

  def _spill(self, run: Run) -> None:
    if self._spill_dir is None:
      parent = self._spill_parent or tempfile.gettempdir()
      fileio.remove_stale(parent, _SPILL_NAME)  # spills of killed counts
      self._spill_dir = tempfile.mkdtemp(
          prefix=fileio.temp_prefix(_SPILL_NAME), dir=parent)
    path = os.path.join(self._spill_dir, f"run{len(self._disk)}")
    self._disk.append(DiskRun(path, run))
    self.spills += 1

  def finish(self, min_count: int) -> Run:
    """The merged run of everything added, pruned to counts >= min_count."""
    result = merge(self._disk + self._memory, min_count)
    self._memory = []
    return result

  def close(self) -> None:
    """Deletes spilled runs; safe to call more than once."""
    for run in self._disk:
      run.delete()
    self._disk = []
    if self._spill_dir is not None and os.path.isdir(self._spill_dir):
      os.rmdir(self._spill_dir)
    self._spill_dir = None
