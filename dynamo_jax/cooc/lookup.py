"""Co-occurrence weights of DynaMo's top-k grid (paper Algorithm 1, step 4).

Shapes (letters as in tensor names):
  B batch, M heads in the grid (the m of the back-off, 2..n), K top-k per
  head, V vocabulary (of the table); here Z slots of one level of the trie
  and C columns of a slot's row.

  topk_ids_BxMxK  int32: topk_ids[b, i] are head i+1's top-k token ids.
  weights         float32 [B, K, ..., K] (M axes of K, in head order): the
                  entry for (x_1..x_M), x_i = topk_ids[b, i, j_i], is
                    (p(x_1..x_M) / prod_i p(x_i)) ** alpha,
                  p(x_1..x_M) = count / positions[M] and p(x) = count(x) /
                  total tokens; exactly 0 when the M-gram is not in the
                  (pruned) table, or an id is outside [0, V).

`to_device(table)` turns a CoocTable into a pytree of jnp arrays (a trie of
cuckoo hash tables, see hashtrie.py, holding each n-gram's ratio
p(x_1..x_m) / prod_i p(x_i), computed in float64) to pass into jitted code;
`grid_weights` reads it with two probes (cuckoo slots) per grid entry and level
(`grid_weights_orders`: every order's grid in one walk).
`DeviceTable` wraps those arrays with a `grid_weights(ids, alpha)` method;
`device_table(table)` builds it once per table object and caches it.
`grid_weights_numpy` is the reference: binary search over the table's sorted
uint64 keys, in float64.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.cooc import hashtrie
from dynamo_jax.cooc import keys as keys_lib
from dynamo_jax.cooc.table import CoocTable
from dynamo_jax.errors import CheckpointError, InputError


def ratios(table: CoocTable, order: int) -> np.ndarray:
  """float32 [R]: p(x_1..x_m) / prod_i p(x_i) of each m-gram in the table.

  Computed in float64 and rounded once, so the device lookup returns it
  as is (to the power alpha).
  """
  ids = keys_lib.decode(table.keys[order], order, table.vocab_size)
  ratio = table.counts[order] / table.positions[order]
  unigrams = table.unigram_counts.astype(np.float64)
  for i in range(order):
    ratio = ratio * (table.total_tokens / unigrams[ids[:, i]])
  if ratio.size and not ratio.max() < np.finfo(np.float32).max:
    raise CheckpointError(f"an order-{order} co-occurrence ratio exceeds "
                          "float32; the table is inconsistent.")
  return ratio.astype(np.float32)


def to_device(table: CoocTable, max_order: int | None = None) -> dict:
  """The table as a pytree of jnp arrays for `grid_weights`.

  Args:
    table: counts to serve.
    max_order: build levels 2..max_order only (default: all of the table's);
      a T3 model needs 3.

  Returns:
    {"root_off", "root_mask": int32 [V],
     "order_m": int32 [S, C] rows (tok, ratio bits[, child_off,
                child_mask]) for m = 2..max_order; see hashtrie.py}
  """
  max_order = table.max_order if max_order is None else max_order
  if not 2 <= max_order <= table.max_order:
    raise InputError(f"max_order must be in 2..{table.max_order} for this "
                     f"table, got {max_order}.")
  values = {m: ratios(table, m) for m in range(2, max_order + 1)}
  arrays = hashtrie.build(table.keys, values, table.vocab_size, max_order)
  return jax.tree.map(jnp.asarray, arrays)


@jax.tree_util.register_pytree_node_class
class DeviceTable:
  """`to_device` arrays with the sampler's interface; a pytree, so it can be
  an argument of jitted functions (from `device_table(table)`)."""

  def __init__(self, arrays: dict, lookup: str = "xla"):
    _check_lookup(lookup)
    self.arrays = arrays
    self.lookup = lookup

  @property
  def max_order(self) -> int:
    return _num_orders(self.arrays)

  def grid_weights(self, topk_ids_BxMxK: jax.Array, alpha=1.0) -> jax.Array:
    """float32 [B, K, ..., K]; see `grid_weights`."""
    return grid_weights(self.arrays, topk_ids_BxMxK, alpha, self.lookup)

  def grid_weights_orders(self, topk_ids_BxNxK: jax.Array,
                          alpha=1.0) -> list:
    """Orders 2..N's weights in one walk; see `grid_weights_orders`."""
    return grid_weights_orders(self.arrays, topk_ids_BxNxK, alpha,
                               lookup=self.lookup)

  def tree_flatten(self):
    return (self.arrays,), self.lookup

  @classmethod
  def tree_unflatten(cls, lookup, children):
    table = object.__new__(cls)  # no checks: jit rebuilds it from leaves
    table.arrays, = children
    table.lookup = lookup
    return table


# id(table) -> {(max_order, lookup): DeviceTable}; an entry goes with its
# table, and both lookups share one set of arrays.
_DEVICE_TABLES: dict[int, dict] = {}


def device_table(table: CoocTable, max_order: int | None = None,
                 lookup: str = "xla") -> DeviceTable:
  """The `DeviceTable` of `table` (levels 2..max_order, default all), its
  arrays built on first use and cached for the table's lifetime: building
  takes seconds for millions of n-grams, and every `generate` call needs it.

  lookup: "xla" (default), the jnp walk below, on any backend; or "native",
  the C++ kernel of dynamo_jax/kernels/cpu_cooc.cc (CPU only, compiled on
  first use; the same bits, tested against this walk)."""
  if not isinstance(table, CoocTable):
    raise InputError(f"device_table needs a CoocTable, got "
                     f"{type(table).__name__}.")
  _check_lookup(lookup)  # before building: that takes seconds
  max_order = table.max_order if max_order is None else max_order
  cached = _DEVICE_TABLES.get(id(table))
  if cached is None:
    cached = _DEVICE_TABLES[id(table)] = {}
    weakref.finalize(table, _DEVICE_TABLES.pop, id(table), None)
  if (max_order, lookup) not in cached:
    same = [t for (m, _), t in cached.items() if m == max_order]
    cached[max_order, lookup] = DeviceTable(
        same[0].arrays if same else to_device(table, max_order), lookup)
  return cached[max_order, lookup]


def _check_lookup(lookup: str) -> None:
  if lookup not in LOOKUPS:
    raise InputError(f"lookup must be one of {LOOKUPS}, got {lookup!r}.")
  if lookup == "native":
    from dynamo_jax.kernels import cpu_cooc  # pylint: disable=import-outside-toplevel
    cpu_cooc.check_backend()


def _num_orders(table_arrays: dict) -> int:
  m = 2
  while f"order_{m + 1}" in table_arrays:
    m += 1
  return m


LOOKUPS = ("xla", "native")

# Capacities, as fractions of the parents, of the branches of the last
# level's lookup; see _last_level_sparse.
PARENT_TIERS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)


def _col(rows_ZxC, slot, c):
  """Column c of the rows at `slot`. Scalar gathers of single columns fuse
  into one loop with the selects; a slot's columns share a cache line, so
  only column 0 misses. Every slot lies inside its parent's block, so the
  gathers skip jnp's negative-index wrap and clamp."""
  return rows_ZxC.at[slot, c].get(mode="promise_in_bounds")


def _slots(off_R, mask_R, batch_R, tokens, i):
  """Both cuckoo slots int32 [R, K] of each parent's K children (head i's
  top-k ids of the parent's batch row: batch_R int32 [R], or None when the
  R parents are the batch's P = R / B each in order), and those ids'
  queries [R, K]."""
  ha_BxMxK, hb_BxMxK, query_BxMxK = tokens
  b, _, k = ha_BxMxK.shape
  if batch_R is None:  # R = B * P parents, batch-major
    r = off_R.shape[0]
    per_parent = lambda x_BxMxK: jnp.broadcast_to(
        x_BxMxK[:, None, i], (b, r // b, k)).reshape(r, k)
  else:
    per_parent = lambda x_BxMxK: x_BxMxK[:, i][batch_R]
  mask_Rx1 = mask_R.astype(jnp.uint32)[:, None]
  local_a_RxK = per_parent(ha_BxMxK) & mask_Rx1
  local_b_RxK = local_a_RxK ^ (((per_parent(hb_BxMxK) & mask_Rx1) | 1)
                               & mask_Rx1)
  return (off_R[:, None] + local_a_RxK.astype(jnp.int32),
          off_R[:, None] + local_b_RxK.astype(jnp.int32),
          per_parent(query_BxMxK))


def _find(rows_ZxC, off_R, mask_R, batch_R, tokens, i):
  """int32 [R, K]: the slot holding each child, the sentinel 0 if none."""
  slot_a, slot_b, query = _slots(off_R, mask_R, batch_R, tokens, i)
  return jnp.where(_col(rows_ZxC, slot_a, 0) == query, slot_a,
                   jnp.where(_col(rows_ZxC, slot_b, 0) == query, slot_b, 0))


def _values(rows_ZxC, off_R, mask_R, batch_R, tokens, i):
  """int32 [R, K]: each child's value bits, 0 if absent. Both candidates'
  values are read without waiting for the token compare (4 independent
  loads per entry, ~15% faster than a dependent third load)."""
  slot_a, slot_b, query = _slots(off_R, mask_R, batch_R, tokens, i)
  return jnp.where(_col(rows_ZxC, slot_a, 0) == query, _col(rows_ZxC, slot_a, 1),
                   jnp.where(_col(rows_ZxC, slot_b, 0) == query,
                             _col(rows_ZxC, slot_b, 1), 0))


def _last_level_sparse(rows_ZxC, off_R, mask_R, tokens, b, i):
  """`_values` of the last level, int32 [R, K], probing only the parents
  that have children (off != 0; the others' children all miss). Of the
  K^2 = 2500 bigram prefixes of a T3 grid only ~1/3 have any (the embedded
  model's table), so their R' rows are gathered into the first of
  PARENT_TIERS' buffers that holds them (lax.switch; all parents when none
  does), probed, and put back in place; the bits are those of probing all."""
  r = off_R.shape[0]
  has_R = off_R != 0
  count = jnp.sum(has_R.astype(jnp.int32))
  rank_R = jnp.cumsum(has_R.astype(jnp.int32)) - 1

  def dense(_):
    return _values(rows_ZxC, off_R, mask_R, None, tokens, i)

  def sparse(cap):
    def run(_):
      idx_C = jnp.nonzero(has_R, size=cap, fill_value=0)[0].astype(jnp.int32)
      batch_C = None if b == 1 else idx_C // (r // b)
      bits_CxK = _values(rows_ZxC, off_R[idx_C], mask_R[idx_C], batch_C,
                         tokens, i)
      return jnp.where(has_R[:, None], bits_CxK[jnp.clip(rank_R, 0, cap - 1)],
                       0)
    return run

  caps = sorted({int(r * f) for f in PARENT_TIERS if 0 < int(r * f) < r})
  tier = sum((count > cap).astype(jnp.int32) for cap in caps)
  return jax.lax.switch(tier, [sparse(cap) for cap in caps] + [dense], None)


def grid_weights(table_arrays: dict, topk_ids_BxMxK: jax.Array,
                 alpha=1.0, lookup: str = "xla") -> jax.Array:
  """float32 [B, K, ..., K]: co-occurrence weights of the top-k grid.

  Jit-friendly; M and K come from the static shape of topk_ids_BxMxK.
  `alpha` may be traced; a Python 1 or 1.0 skips the power.
  """
  return grid_weights_orders(table_arrays, topk_ids_BxMxK, alpha,
                             orders=(topk_ids_BxMxK.shape[1],),
                             lookup=lookup)[0]


def grid_weights_orders(table_arrays: dict, topk_ids_BxNxK: jax.Array,
                        alpha=1.0, orders=None, lookup: str = "xla") -> list:
  """[`grid_weights(table_arrays, topk_ids_BxNxK[:, :m], alpha)` for m in
  `orders`] (default 2..N), the same bits, from one walk down the trie: the
  order-m grid's weights are the values of the slots the walk to level N
  finds at level m anyway. lookup "native": the walk by the C++ kernel
  (kernels/cpu_cooc.py), the same bits."""
  b, m_heads, k = topk_ids_BxNxK.shape
  orders = tuple(range(2, m_heads + 1)) if orders is None else tuple(orders)
  if not 2 <= m_heads <= _num_orders(table_arrays):
    raise InputError(f"grid_weights needs 2 <= M <= "
                     f"{_num_orders(table_arrays)} (the orders on device), "
                     f"got M = {m_heads}.")
  _check_lookup(lookup)
  if lookup == "native":
    from dynamo_jax.kernels import cpu_cooc  # pylint: disable=import-outside-toplevel
    if m_heads > cpu_cooc.MAX_ORDER:
      raise InputError(f"the native lookup reads grids of up to "
                       f"{cpu_cooc.MAX_ORDER} heads, got M = {m_heads}.")
    bits = dict(zip(range(2, m_heads + 1),
                    cpu_cooc.grid_bits(table_arrays, topk_ids_BxNxK)))
    return _ratios_of_bits(bits, orders, alpha, b, k)
  root_off_V = table_arrays["root_off"]
  ids_BxMxK = topk_ids_BxNxK.astype(jnp.int32)
  valid_BxMxK = (ids_BxMxK >= 0) & (ids_BxMxK < root_off_V.shape[0])
  safe_BxMxK = jnp.where(valid_BxMxK, ids_BxMxK, 0)
  # Stored tokens are >= -1, so -2 matches nothing: out-of-range ids miss.
  query_BxMxK = jnp.where(valid_BxMxK, ids_BxMxK, -2)
  # Materialised once per token: without the barrier XLA fuses the hash
  # (and the range check) into every grid entry's loop body, recomputing it
  # K^(M-1) times per token (1.5x the whole lookup's time on XLA CPU).
  ha_BxMxK, hb_BxMxK, query_BxMxK = jax.lax.optimization_barrier((
      hashtrie.hash_a(safe_BxMxK, jnp), hashtrie.hash_b(safe_BxMxK, jnp),
      query_BxMxK))

  # The parents of the current level: P = K**(m-1) prefixes per batch row,
  # flattened with the batch into R = B * P. Keeping R as the outer axis
  # lets XLA's CPU backend split each level's loop over threads.
  # An invalid first id starts at the sentinel (offset 0 and mask 0).
  first_B, valid_B = safe_BxMxK[:, 0], valid_BxMxK[:, 0]
  off_R = jnp.where(valid_B, root_off_V[first_B], 0).reshape(-1)
  mask_R = jnp.where(valid_B, table_arrays["root_mask"][first_B], 0).reshape(-1)
  tokens = (ha_BxMxK, hb_BxMxK, query_BxMxK)
  bits = {}
  for m in range(2, m_heads):
    rows_ZxC = table_arrays[f"order_{m}"]
    slot_RxK = _find(rows_ZxC, off_R, mask_R, None, tokens, m - 1)
    # The sentinel's value is 0.0, so a miss reads 0 as `_values` gives.
    bits[m] = _col(rows_ZxC, slot_RxK, 1)
    off_R = _col(rows_ZxC, slot_RxK, 2).reshape(-1)
    mask_R = _col(rows_ZxC, slot_RxK, 3).reshape(-1)
  rows_ZxC = table_arrays[f"order_{m_heads}"]
  if m_heads == 2:
    bits[2] = _values(rows_ZxC, off_R, mask_R, None, tokens, 1)
  else:
    bits[m_heads] = _last_level_sparse(rows_ZxC, off_R, mask_R, tokens, b,
                                       m_heads - 1)
  return _ratios_of_bits(bits, orders, alpha, b, k)


def _ratios_of_bits(bits: dict, orders, alpha, b: int, k: int) -> list:
  """The weights [B, K, .., K] of `orders` from their value bits (0: absent),
  to the power alpha."""
  out = []
  for m in orders:
    ratio = jax.lax.bitcast_convert_type(bits[m], jnp.float32)
    if not (isinstance(alpha, (int, float)) and alpha == 1):
      ratio = jnp.where(ratio > 0,
                        jnp.power(ratio, jnp.asarray(alpha, jnp.float32)), 0.0)
    out.append(ratio.reshape((b,) + (k,) * m))
  return out


def grid_weights_numpy(table: CoocTable, topk_ids_BxMxK: np.ndarray,
                       alpha: float = 1.0) -> np.ndarray:
  """Reference for `grid_weights`, from the CoocTable itself (float64 math,
  float32 result)."""
  ids = np.asarray(topk_ids_BxMxK, np.int64)
  b, m_heads, k = ids.shape
  v = table.vocab_size
  # Every grid point as a row of M ids, in C order of [B, K, ..., K].
  mesh = np.meshgrid(*[np.arange(k)] * m_heads, indexing="ij")
  rows = np.stack([g.ravel() for g in mesh], axis=-1)  # [K**M, M]
  grid_BxGxM = np.stack([ids[:, i][:, rows[:, i]] for i in range(m_heads)],
                        axis=-1)
  valid = np.all((grid_BxGxM >= 0) & (grid_BxGxM < v), axis=-1)
  safe = np.where(grid_BxGxM >= 0, np.minimum(grid_BxGxM, v - 1), 0)
  keys = keys_lib.encode(safe.reshape(-1, m_heads), v).reshape(valid.shape)
  table_keys = table.keys[m_heads]
  pos = np.minimum(np.searchsorted(table_keys, keys), table_keys.size - 1)
  if table_keys.size:
    found = valid & (table_keys[pos] == keys)
    count = np.where(found, table.counts[m_heads][pos], 0).astype(np.float64)
  else:
    count = np.zeros(keys.shape)
  p_joint = count / table.positions[m_heads]
  p_tokens = table.unigram_counts[safe].astype(np.float64) / table.total_tokens
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = p_joint / np.prod(p_tokens, axis=-1)
    weights = np.where(count > 0, ratio**alpha, 0.0)
  return weights.reshape((b,) + (k,) * m_heads).astype(np.float32)
