"""DynaMo's per-step sampler: dynamic multi-token sampling (Algorithm 1).

One forward pass gives n marginals; `dynamo_sample` turns them into 1..n
tokens for each batch row. It is jitted with static shapes: the back-off over
m = n..1 cannot branch on traced values, so every order's joint grid (k^n,
..., k^2) is built and each row takes the largest m whose grid passes, so
rows in a batch get their own m (every order's peak and pass/fail is part of
the result). An order whose joint has no entry >= eps_b in any row skips its
blur, Otsu and draw (lax.cond: its final grid is all zero), which is most
orders of most steps at eps_b >= 0.5. Order 1 is plain autoregressive sampling of head 1.
Orders >= 2 (steps 3-8) are `kernels.threshold_and_draw`: the Pallas kernel,
or with kernel="reference" its jnp reference built from `ops/grid.py`.

Shape letters: B batch, N heads (in `tokens_BxN` and the per-order debug
arrays, N is the order n asked for, <= the heads in the logits), V vocab,
K top-k, M current order, H history length, E = K^M grid entries.

Decisions where the paper is silent (see also ops/grid.py):
  * Top-k is taken on the raw logits (temperature > 0 keeps the order) and
    each head's k values are renormalised: softmax(top_k_logits / T). Since J
    is renormalised after the co-occurrence weighting anyway, renormalising
    the marginals changes nothing, and the full-vocab softmax is skipped.
  * J is renormalised after the weighting (always, also without a table), and
    NOT again after thresholding: eps_b and the back-off test see
    probabilities of the full top-k joint. It is normalised only for the draw.
  * Step 5's "entries below eps_b set to 0" is applied literally (J < eps_b
    -> 0), then step 6, then step 7's test "some entry > eps_b^(m-1)"
    (strict). For m >= 2 every survivor of step 5 is >= eps_b >=
    eps_b^(m-1), so the test differs from "some entry survived" only through
    the repetition penalty and at equality; we keep both as written. The
    strict test makes eps_b = 1 always back off to plain AR.
  * Repetition penalty on a tuple: its grid entry is divided by
    `repetition_penalty` once per position whose token is in the history
    (positions of the tuple itself do not count). The caller decides what
    the history holds (the prompt, or only generated tokens). It must be
    >= 1: a reward for repetition could lift an entry above eps_b^(m-1) and
    break "eps_b = 1 is plain AR".
  * m = 1 is exactly plain AR: temperature sampling of head 1 over the full
    vocabulary, no top-k, no penalty, the same draw as
    `jax.random.categorical(key, logits[:, 0] / T[0])` (greedy: argmax of
    head 1's raw logits, first index on ties). It is computed only when
    some row backs off to m = 1 (lax.cond): a 50k-way Gumbel draw costs
    ~0.2 ms, half the rest of the sampler.
  * Keys: either one key per row (typed [B] or raw uint32 [B, 2]), so that
    a row's result does not depend on the rest of the batch; or one key for
    the whole batch. Per row, order 1 is `categorical(key_b, logits_b)` over
    [V], bit for bit what `sampling.sample_tokens` draws with the same row
    keys; a single key is `categorical(key, logits)` over [B, V]. Tuples
    use u = uniform(fold_in(key, 1)), shape [] per row or [B] for one key.
  * Greedy (not in the paper): same back-off, then the grid's first maximum
    in C order instead of a draw.
  * NaN logits are not supported.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import kernels
from dynamo_jax.decoding import sampler_topk
from dynamo_jax.errors import InputError


class CoocWeights(Protocol):
  """The co-occurrence table's interface (implemented elsewhere)."""

  def grid_weights(self, topk_ids_BxMxK: jax.Array, alpha: float) -> jax.Array:
    """float32 [B, K, ..., K] (M trailing axes): entry (i_1..i_M) is
    (p(x_1..x_M) / prod_j p(x_j)) ** alpha for x_j = topk_ids[b, j, i_j],
    exactly 0 for n-grams absent from the table. Must trace under jit;
    alpha arrives as a Python float.

    A table may also have `grid_weights_orders(topk_ids_BxNxK, alpha)`:
    the list of orders 2..N's weights, each equal to grid_weights'
    (DeviceTable's walks its trie once for all orders)."""


class SampleResult(NamedTuple):
  """One step's output per row, plus what the back-off looked at."""
  m_B: jax.Array            # int32 [B], tokens emitted, 1..n
  tokens_BxN: jax.Array     # int32 [B, n], first m valid, the rest 0
  joint_prob_B: jax.Array   # float32 [B], p of the emitted tuple (final grid)
  passed_BxN: jax.Array     # bool [B, n], order m passed back-off (col m-1)
  peak_BxN: jax.Array       # float32 [B, n], largest final entry of order m
                            # (the value tested against eps_b^(m-1)); col 0 is 0
  topk_ids_BxNxK: jax.Array    # int32 [B, n, K], per head, descending
  topk_probs_BxNxK: jax.Array  # float32 [B, n, K], renormalised in the top-k
  u_B: jax.Array            # float32 [B], the uniform of the tuple draw


def topk_marginals(logits_BxNxV: jax.Array, temperature_N: jax.Array,
                   history_BxHs: jax.Array, history_len_B: jax.Array, *,
                   k: int):
  """Step 2 for all N heads given: (ids int32 [B,N,K], probs [B,N,K] summing
  to 1 per head, seen bool [B,N,K] = id is in the row's valid history)."""
  b, _, v = logits_BxNxV.shape
  logits_BxNxV = logits_BxNxV.astype(jnp.float32)
  # The barrier keeps lax.top_k (exact_top_k's path for small V or large k)
  # on XLA CPU's TopK routine: without it, later passes fold the top-k slice
  # into its consumers and it becomes a full sort of V (27 ms instead of
  # 0.2 ms at B=1, V=50304).
  top_BxNxK, ids_BxNxK = jax.lax.optimization_barrier(
      sampler_topk.exact_top_k(logits_BxNxV, k))
  probs_BxNxK = jax.nn.softmax(top_BxNxK / temperature_N[None, :, None],
                               axis=-1)
  # A vocab-sized membership mask costs O(V + H) per row, less than
  # comparing every top-k id with every history token once H is long.
  valid_BxHs = jnp.arange(history_BxHs.shape[1]) < history_len_B[:, None]
  hist_BxHs = jnp.where(valid_BxHs, history_BxHs.astype(jnp.int32), v)
  rows_BxHs = jnp.broadcast_to(jnp.arange(b)[:, None], hist_BxHs.shape)
  seen_BxV = jnp.zeros((b, v), jnp.bool_).at[rows_BxHs, hist_BxHs].set(
      True, mode="drop")
  seen_BxNxK = jax.vmap(lambda s_V, i_NxK: s_V[i_NxK])(seen_BxV, ids_BxNxK)
  return ids_BxNxK.astype(jnp.int32), probs_BxNxK, seen_BxNxK


def _first_argmax(x_BxV: jax.Array) -> jax.Array:
  """jnp.argmax(x, -1) (first index on ties) for finite x. XLA CPU runs an
  argmax with a fused producer (the Gumbel noise) as a scalar loop, ~4x
  slower; max + first-equal behind a barrier stays vectorised."""
  x_BxV = jax.lax.optimization_barrier(x_BxV)
  peak_Bx1 = jnp.max(x_BxV, axis=1, keepdims=True)
  v = x_BxV.shape[1]
  idx = jnp.min(jnp.where(x_BxV == peak_Bx1, jnp.arange(v, dtype=jnp.int32),
                          v), axis=1)
  return jnp.minimum(idx, v - 1)


def plain_ar(keys, logits_BxV: jax.Array, temperature: jax.Array, *,
             greedy: bool, per_row: bool):
  """Order 1: (token int32 [B], its probability under softmax(logits/T))."""
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  if greedy:
    token_B = _first_argmax(logits_BxV.astype(jnp.float32))
  else:
    # Exactly jax.random.categorical(key, scaled): argmax(gumbel + logits)
    # with the same Gumbel call (tests hold us to it).
    b, v = scaled_BxV.shape
    if per_row:
      gumbel_BxV = jax.vmap(
          lambda key: jax.random.gumbel(key, (v,), jnp.float32))(keys)
    else:
      gumbel_BxV = jax.random.gumbel(keys, (b, v), jnp.float32)
    token_B = _first_argmax(gumbel_BxV + scaled_BxV)
  logp_BxV = scaled_BxV - jax.nn.logsumexp(scaled_BxV, axis=1, keepdims=True)
  logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=1)[:, 0]
  return token_B, jnp.exp(logp_B)


def order1_where_needed(keys, logits_BxNxV: jax.Array, temperature,
                        needed_B: jax.Array, *, greedy: bool, per_row: bool):
  """`plain_ar` on head 1 (token int32 [B], probability [B]), computed only
  when some row needs it (lax.cond); zeros when none does."""
  b = needed_B.shape[0]

  def order1(_):
    # Head 1's logits are sliced here, not outside: a cond operand would be
    # copied even when the branch is skipped.
    return plain_ar(keys, logits_BxNxV[:, 0], temperature, greedy=greedy,
                    per_row=per_row)

  def skip(_):
    return jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)

  return jax.lax.cond(jnp.any(needed_B), order1, skip, None)


def tuple_uniforms(keys, batch: int, *, per_row: bool) -> jax.Array:
  """float32 [B]: the uniform each row's tuple draw inverts the CDF with."""
  if per_row:
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1),
                                                   ()))(keys)
  return jax.random.uniform(jax.random.fold_in(keys, 1), (batch,))


def order_weights(ids_BxNxK, cooc, *, n, k, alpha, use_cooc):
  """Co-occurrence weights of orders m = 2..n: float32 [B, K, ..., K] (m
  axes) each, or None each without a table."""
  b = ids_BxNxK.shape[0]
  if not (use_cooc and cooc is not None):
    return [None] * (n - 1)
  if n >= 2 and hasattr(cooc, "grid_weights_orders"):
    out = list(cooc.grid_weights_orders(ids_BxNxK[:, :n], alpha))
  else:
    out = [cooc.grid_weights(ids_BxNxK[:, :m], alpha) for m in range(2, n + 1)]
  for m, weights in zip(range(2, n + 1), out):
    if weights.shape != (b,) + (k,) * m:
      raise InputError(f"cooc.grid_weights returned shape {weights.shape},"
                       f" expected {(b,) + (k,) * m}.")
  return [weights.astype(jnp.float32) for weights in out]


def add_order1(keys, logits_BxNxV, temperature, draws, *, greedy, per_row):
  """Rows where no order >= 2 passed (m = 1) get plain AR on head 1."""
  one_B = draws.m_B == 1
  ar_token_B, ar_prob_B = order1_where_needed(
      keys, logits_BxNxV, temperature, one_B, greedy=greedy, per_row=per_row)
  ar_BxN = jnp.zeros_like(draws.tokens_BxN).at[:, 0].set(ar_token_B)
  tokens_BxN = jnp.where(one_B[:, None], ar_BxN, draws.tokens_BxN)
  joint_prob_B = jnp.where(one_B, ar_prob_B, draws.joint_prob_B)
  return draws.m_B, tokens_BxN, joint_prob_B, draws.passed_BxN, draws.peak_BxN


def _sample_core(keys, logits_BxNxV, history_BxHs, history_len_B, cooc,
                 temperature_N, eps_b, repetition_penalty, *, n, k, alpha,
                 use_cooc, blur, otsu, greedy, per_row,
                 kernel="reference") -> SampleResult:
  ids_BxNxK, probs_BxNxK, seen_BxNxK = topk_marginals(
      logits_BxNxV[:, :n], temperature_N, history_BxHs, history_len_B, k=k)
  u_B = tuple_uniforms(keys, logits_BxNxV.shape[0], per_row=per_row)
  weights = order_weights(ids_BxNxK, cooc, n=n, k=k, alpha=alpha,
                          use_cooc=use_cooc)
  draws = kernels.threshold_and_draw(
      ids_BxNxK, probs_BxNxK, seen_BxNxK, weights, eps_b, repetition_penalty,
      u_B, blur=blur, otsu=otsu, greedy=greedy, kernel=kernel)
  m_B, tokens_BxN, joint_prob_B, passed_BxN, peak_BxN = add_order1(
      keys, logits_BxNxV, temperature_N[0], draws, greedy=greedy,
      per_row=per_row)
  return SampleResult(m_B=m_B, tokens_BxN=tokens_BxN,
                      joint_prob_B=joint_prob_B, passed_BxN=passed_BxN,
                      peak_BxN=peak_BxN, topk_ids_BxNxK=ids_BxNxK,
                      topk_probs_BxNxK=probs_BxNxK, u_B=u_B)


# The static arguments of `dynamo_sample`, for calling it under one's own
# jit: jax.jit(dynamo_sample, static_argnames=STATIC_ARGNAMES).
STATIC_ARGNAMES = ("n", "k", "alpha", "use_cooc", "blur", "otsu", "greedy",
                   "kernel")
_STATIC = STATIC_ARGNAMES + ("per_row",)
# A cooc that is a pytree of arrays is traced (its tables stay arguments, not
# compile-time constants); an opaque object is a static argument instead.
_core_traced = jax.jit(_sample_core, static_argnames=_STATIC)
_core_static = jax.jit(_sample_core, static_argnames=_STATIC + ("cooc",))


def _concrete(x):
  """numpy value of x, or None when x is traced (checked by the caller's
  jit instead of here)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_key(key, batch: int) -> bool:
  """Validates the key(s); returns True for one key per row."""
  key_shape = tuple(np.shape(key))
  if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    if key_shape in ((), (batch,)):
      return key_shape == (batch,)
  elif len(key_shape) in (1, 2):
    if len(key_shape) == 1 or key_shape[0] == batch:
      return len(key_shape) == 2
  raise InputError(
      f"key has shape {key_shape}; pass one key (typed [] or raw [2]) or one "
      f"per row (typed [{batch}] or raw [{batch}, 2]).")


def _check_inputs(logits_BxNxV, history_BxHs, history_len_B, cooc, *, n, k,
                  temperature, eps_b, alpha, use_cooc, repetition_penalty):
  if np.ndim(logits_BxNxV) != 3:
    raise InputError(f"logits must be [B, N, V], got shape "
                     f"{np.shape(logits_BxNxV)}.")
  b, heads, v = np.shape(logits_BxNxV)
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= heads:
    raise InputError(f"n must be an integer in 1..{heads} (heads in the "
                     f"logits), got {n!r}.")
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= v:
    raise InputError(f"k must be an integer in 1..{v} (the vocabulary), got "
                     f"{k!r}.")
  if np.shape(temperature) not in ((), (heads,)):
    raise InputError(f"temperature must be a scalar or one per head "
                     f"[{heads}], got shape {np.shape(temperature)}.")
  for name, value in (("eps_b", eps_b),
                      ("repetition_penalty", repetition_penalty)):
    if np.ndim(value) != 0:
      raise InputError(f"{name} must be a scalar, got shape "
                       f"{np.shape(value)}.")
  checks = (
      ("temperature", temperature, lambda t: np.all(t > 0) and
       np.all(np.isfinite(t)), "finite and > 0 (use greedy=True for argmax)"),
      ("eps_b", eps_b, lambda e: 0 <= e <= 1, "in [0, 1]"),
      ("repetition_penalty", repetition_penalty,
       lambda r: 1 <= r < np.inf, "finite and >= 1 (1 disables it)"),
  )
  for name, value, ok, need in checks:
    concrete = _concrete(value)
    if concrete is not None and not ok(concrete):
      raise InputError(f"{name} must be {need}, got {value!r}.")
  if not (isinstance(alpha, (int, float)) and 0 <= alpha < math.inf):
    raise InputError(f"alpha must be a finite Python float >= 0, got "
                     f"{alpha!r}.")
  if np.ndim(history_BxHs) != 2 or np.shape(history_BxHs)[0] != b:
    raise InputError(f"history must be [B={b}, H], got shape "
                     f"{np.shape(history_BxHs)}.")
  if not jnp.issubdtype(jnp.result_type(history_BxHs), jnp.integer):
    raise InputError(f"history must hold integer token ids, got dtype "
                     f"{jnp.result_type(history_BxHs)}.")
  if np.shape(history_len_B) != (b,):
    raise InputError(f"history_len must be [B={b}], got shape "
                     f"{np.shape(history_len_B)}.")
  lengths = _concrete(history_len_B)
  if lengths is not None and (np.any(lengths < 0) or
                              np.any(lengths > np.shape(history_BxHs)[1])):
    raise InputError(f"history_len must lie in 0..{np.shape(history_BxHs)[1]},"
                     f" got {lengths.tolist()}.")
  if use_cooc and cooc is not None and not hasattr(cooc, "grid_weights"):
    raise InputError(f"cooc must be None or have grid_weights(ids, alpha); "
                     f"got {type(cooc).__name__}.")


def dynamo_sample(key, logits_BxNxV, history_BxHs, history_len_B, cooc, *,
                  n: int, k: int = 50, temperature=0.7, eps_b=0.5,
                  alpha: float = 1.0, use_cooc: bool = True,
                  blur: bool = True, otsu: bool = True,
                  repetition_penalty=1.1, greedy: bool = False,
                  kernel: str = "reference") -> SampleResult:
  """One DynaMo sampling step (Algorithm 1) for every row of a batch.

  Args:
    key: one PRNG key per row (typed [B] or raw uint32 [B, 2]: rows are then
      independent of the batch) or one key for the batch (typed [] or raw
      [2]); see the module docstring for how keys are used.
    logits_BxNxV: float [B, N, V], the heads' logits at the last position.
    history_BxHs: int [B, Hs], tokens already generated (first history_len_B
      valid per row); their ids are penalised in grids of order >= 2.
    history_len_B: int [B].
    cooc: None or a `CoocWeights` (a pytree of arrays is traced; any other
      object must be hashable and is static).
    n: largest order tried (uses heads 1..n).
    k: top-k per head.
    temperature: scalar or float [N], per head, > 0.
    eps_b: back-off threshold in [0, 1]; 0 always emits n tokens when no
      table masks the grid, 1 is plain AR.
    alpha: co-occurrence exponent (static).
    use_cooc, blur, otsu: switch the co-occurrence weighting, the blur before
      Otsu, and Otsu's threshold.
    repetition_penalty: >= 1; 1 disables it.
    greedy: argmax instead of sampling (orders >= 2 and order 1 alike).
    kernel: "reference" (the jnp grid steps of ops/grid.py) or "pallas"
      (the fused kernel in dynamo_jax/kernels; interpreted on CPU).

  Returns:
    SampleResult; tokens_BxN[b, :m_B[b]] are the row's new tokens.

  Raises:
    InputError: for arguments outside their documented ranges. Values that
      are traced (a call inside an outer jit) are not checked.
  """
  _check_inputs(logits_BxNxV, history_BxHs, history_len_B, cooc, n=n, k=k,
                temperature=temperature, eps_b=eps_b, alpha=alpha,
                use_cooc=use_cooc, repetition_penalty=repetition_penalty)
  b, heads, _ = np.shape(logits_BxNxV)
  if kernel not in kernels.KERNELS:
    raise InputError(f"kernel {kernel!r} unknown; available: "
                     f"{kernels.KERNELS}.")
  per_row = _check_key(key, b)
  # numpy when concrete: each eager jnp op here would cost a dispatch.
  xp = np if _concrete(temperature) is not None else jnp
  temperature_N = xp.broadcast_to(xp.asarray(temperature, np.float32),
                                  (heads,))[:n]
  as_f32 = lambda x: (np.float32(x) if _concrete(x) is not None
                      else jnp.asarray(x, jnp.float32))
  leaves = jax.tree_util.tree_leaves(cooc)
  opaque = cooc is not None and len(leaves) == 1 and leaves[0] is cooc
  core = _core_static if opaque else _core_traced
  return core(key, logits_BxNxV, history_BxHs, history_len_B, cooc,
              temperature_N, as_f32(eps_b), as_f32(repetition_penalty),
              n=int(n), k=int(k), alpha=float(alpha), use_cooc=bool(use_cooc),
              blur=bool(blur), otsu=bool(otsu), greedy=bool(greedy),
              per_row=per_row, kernel=kernel)
