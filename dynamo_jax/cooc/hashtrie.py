"""A trie of cuckoo hash tables over n-grams, built in numpy for `lookup.py`.

Level m (2..max_order) holds the m-grams. Each of its entries lives in the
sub-table of its parent: the token x_1 for m = 2, else the slot of the
(m-1)-gram prefix in level m-1. A parent's sub-table is a power-of-two block
of slots [off, off + size) in the level's rows, at load <= 1/2. An entry
with last token x sits in one of two slots (cuckoo hashing),
  off + a  or  off + (a ^ (((hash_b(x) & mask) | 1) & mask)),
  with mask = size - 1 and a = hash_a(x) & mask,
which differ for size >= 2; a lookup reads both, whatever the table size.
Because the hashes depend on x alone, they are computed once per candidate
token, and the K lookups of one parent touch one small block of memory.

Slot 0 of every level is a sentinel: token -1 (never a query token), value
0, children (off 0, mask 0), i.e. itself. Parents without children, and
misses, point there, so an absent prefix makes every longer n-gram absent
without any branch.

Each level is one int32 array rows [S, C] (S slots, S < 2**31), a slot's
fields side by side in one cache line:
  column 0  tok         the entry's last token, -1 in empty slots
  column 1  val         the entry's float32 value as bits, 0.0 in empty
                        slots (lookup.py stores the co-occurrence ratio)
  column 2  child_off   first slot of the entry's sub-table in level m+1
  column 3  child_mask  that sub-table's size - 1
Columns 2 and 3 exist below the last level only (C = 4, else C = 2). The
parents of level 2 are tokens: root_off, root_mask int32 [V].
"""

from __future__ import annotations

import numpy as np

from dynamo_jax.errors import CheckpointError

SEED_A = np.uint32(0x9E3779B9)
SEED_B = np.uint32(0x7F4A7C15)
_MAX_ROUNDS = 200  # parallel insertion rounds before growing a sub-table
_MAX_GROWTHS = 20


def mix32(x, xp=np):
  """A bijective 32-bit integer mixer (MurmurHash3's finaliser), written so
  that numpy and jax.numpy give the same bits: x is a uint32 array."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * xp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_a(tok, xp=np):
  return mix32(tok.astype(xp.uint32) ^ xp.uint32(SEED_A), xp)


def hash_b(tok, xp=np):
  return mix32(tok.astype(xp.uint32) ^ xp.uint32(SEED_B), xp)


def _pow2_at_least(n: np.ndarray) -> np.ndarray:
  n = np.maximum(n, 1).astype(np.int64)
  return (1 << np.ceil(np.log2(n)).astype(np.int64)).astype(np.int64)


def _slots(off, mask, ha, hb):
  """The two candidate slots of entries; they differ in sub-tables of size
  >= 2: the second is the first XOR an odd offset (both ways round)."""
  slot_a = ha & mask
  slot_b = slot_a ^ (((hb & mask) | 1) & mask)
  return off + slot_a, off + slot_b


def _insert(owner: np.ndarray, slot_a: np.ndarray, slot_b: np.ndarray,
            pending: np.ndarray) -> np.ndarray:
  """Parallel cuckoo insertion of entries `pending` into `owner` (in place).

  Every round, each unplaced entry writes itself to its current choice of
  slot; one writer per slot wins and evicts the previous owner; the losers
  and the evicted switch to their other slot for the next round. Returns the
  entries still unplaced after _MAX_ROUNDS (their sub-tables hold a cycle).
  """
  scratch = np.empty(owner.size, np.int64)
  use_b = np.zeros(slot_a.size, bool)
  for _ in range(_MAX_ROUNDS):
    if not pending.size:
      break
    target = np.where(use_b[pending], slot_b[pending], slot_a[pending])
    scratch[target] = pending  # some writer wins each slot; which is moot
    won = scratch[target] == pending
    winners, won_slots = pending[won], target[won]
    evicted = owner[won_slots]
    evicted = evicted[evicted >= 0]
    owner[won_slots] = winners
    pending = np.concatenate([pending[~won], evicted])
    use_b[pending] = ~use_b[pending]
  return pending


def build_level(parent: np.ndarray, tok: np.ndarray, val: np.ndarray,
                num_parents: int):
  """Places entries (parent, tok) -> val into per-parent cuckoo sub-tables.

  Args:
    parent: int64 [R] parent index of each entry, in [0, num_parents).
    tok: int64 [R] last token of each entry; (parent, tok) pairs distinct.
    val: float32 [R] value of each entry.
    num_parents: number of parents.

  Returns:
    (rows int32 [S, 2] (tok, val bits), child_off int32 [num_parents],
     child_mask int32 [num_parents], slot_of_entry int64 [R]).
  """
  fanout = np.bincount(parent, minlength=num_parents)
  size = np.where(fanout > 0, _pow2_at_least(2 * fanout), 0)
  off = np.concatenate([[1], 1 + np.cumsum(size)[:-1]]).astype(np.int64)
  ha = hash_a(tok).astype(np.int64)
  hb = hash_b(tok).astype(np.int64)
  owner = np.full(1 + int(size.sum()), -1, np.int64)
  slot_a, slot_b = _slots(off[parent], np.maximum(size - 1, 0)[parent], ha, hb)
  redo = np.arange(tok.size)
  for _ in range(_MAX_GROWTHS):
    stuck = _insert(owner, slot_a, slot_b, redo)
    if not stuck.size:
      break
    # Rare cycles: move the parents concerned to new sub-tables, twice as
    # large, at the end of the level (their old blocks stay empty).
    grow = np.zeros(num_parents, bool)
    grow[parent[stuck]] = True
    placed = owner >= 0
    owner[np.flatnonzero(placed)[grow[parent[owner[placed]]]]] = -1
    grown = np.flatnonzero(grow)
    size[grown] *= 2
    off[grown] = owner.size + np.cumsum(size[grown]) - size[grown]
    owner = np.concatenate([owner, np.full(int(size[grown].sum()), -1)])
    redo = np.flatnonzero(grow[parent])
    slot_a[redo], slot_b[redo] = _slots(off[parent[redo]],
                                        size[parent[redo]] - 1, ha[redo],
                                        hb[redo])
  else:
    raise CheckpointError("could not build the co-occurrence hash table "
                          "(cuckoo insertion cycles); please report this.")
  if owner.size >= 2**31:
    raise CheckpointError(f"a co-occurrence level needs {owner.size} slots, "
                          "more than int32 indexes; prune more (min_count).")
  used = np.flatnonzero(owner >= 0)
  rows = np.zeros((owner.size, 2), np.int32)
  rows[:, 0] = -1
  rows[used, 0] = tok[owner[used]]
  rows[used, 1] = val[owner[used]].astype(np.float32).view(np.int32)
  slot_of_entry = np.empty(tok.size, np.int64)
  slot_of_entry[owner[used]] = used
  child_off = np.where(size > 0, off, 0).astype(np.int32)
  child_mask = np.maximum(size - 1, 0).astype(np.int32)
  return rows, child_off, child_mask, slot_of_entry


def build(keys: dict, values: dict, vocab_size: int, max_order: int) -> dict:
  """The trie's numpy arrays for orders 2..max_order (layout: module doc).

  Args:
    keys: order m -> uint64 [R_m] sorted m-gram keys (keys.py).
    values: order m -> float32 [R_m], the value stored with each key.
    vocab_size: V.
    max_order: the last level built.
  """
  out = {}
  parent = None
  num_parents = vocab_size
  prev_slot_of_entry = None
  v = np.uint64(vocab_size)
  for m in range(2, max_order + 1):
    k = keys[m]
    prefix, tok = k // v, (k % v).astype(np.int64)
    if m == 2:
      parent = prefix.astype(np.int64)
    else:
      idx = np.searchsorted(keys[m - 1], prefix)
      idx_ok = np.minimum(idx, max(keys[m - 1].size - 1, 0))
      if k.size and (keys[m - 1].size == 0 or
                     np.any(keys[m - 1][idx_ok] != prefix)):
        raise CheckpointError(
            f"the table has {m}-grams whose {m - 1}-gram prefix is absent; "
            "a table pruned with one min_count for all orders never has "
            "them (corrupt or hand-made table?).")
      parent = prev_slot_of_entry[idx_ok]
    rows, child_off, child_mask, slot_of_entry = build_level(
        parent, tok, values[m], num_parents)
    if m == 2:
      out["root_off"], out["root_mask"] = child_off, child_mask
    else:
      parent_rows = out[f"order_{m - 1}"]
      out[f"order_{m - 1}"] = np.concatenate(
          [parent_rows, child_off[:, None], child_mask[:, None]], axis=1)
    out[f"order_{m}"] = rows
    num_parents = rows.shape[0]
    prev_slot_of_entry = slot_of_entry
  return out
