"""Every order's grid step and the back-off (Algorithm 1, steps 3-8 for
orders m >= 2), by the Pallas kernel or by its jnp reference.

`threshold_and_draw` is what the sampler (dynamo_sampler) calls between the
top-k marginals and the order-1 (plain AR) draw: for m = 2..n it builds,
masks, thresholds and draws from each order's grid (one call of the
one-order op per order), applies the back-off test peak > eps_b^(m-1), and
maps the chosen entry to tokens. Rows where no order passes get m = 1 and
are left to the caller's plain AR draw. The reference skips an order's blur,
Otsu and draw when no entry of its joint reaches eps_b (the outputs are
those of the full computation: an all-zero final grid).

Kernel choice is explicit and fails loudly: kernel="reference" is the
one-order op's jnp reference (`ops.grid.grid_threshold_draw_reference`),
kernel="pallas" the fused kernel (`dynamo_grid.grid_threshold_draw`),
compiled on a TPU (Mosaic) or a GPU (Triton) and run in interpret mode on
CPU. A request the machine cannot honour is an InputError, never a quiet
switch to the reference.

Shape letters: B batch, N largest order (heads), K top-k.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dynamo_jax.errors import InputError
from dynamo_jax.kernels import dynamo_grid
from dynamo_jax.ops import grid

KERNELS = ("reference", "pallas")
# jax.default_backend() -> the kernel backend that compiles there.
_NATIVE = {"tpu": "tpu", "gpu": "triton", "cuda": "triton", "rocm": "triton"}


class GridDraws(NamedTuple):
  """Orders >= 2 of one step, per row."""
  m_B: jax.Array           # int32 [B], largest passing order; 1 when none
  tokens_BxN: jax.Array    # int32 [B, N], the first m valid; 0 where m = 1
  joint_prob_B: jax.Array  # float32 [B], p of the tuple; 0 where m = 1
  passed_BxN: jax.Array    # bool [B, N], order m passed (col 0 always True)
  peak_BxN: jax.Array      # float32 [B, N], largest final entry; col 0 is 0


def resolve_backend(backend: str | None, interpret):
  """(backend, interpret) of an explicit Pallas request, or (None, None)
  for "this machine's": then the choice is made when the program is
  lowered (lax.platform_dependent): Mosaic on TPU, Triton on GPU, the
  Triton layout in interpret mode on CPU. So a program traced on CPU and
  exported for "tpu" or "cuda" holds the compiled kernel.

  An explicit backend with interpret=False is taken as asked (lowering it
  for a platform that cannot run it fails in JAX); an explicit backend with
  interpret=None must match the machine or is an InputError; interpret=False
  with no backend needs a TPU or GPU.
  """
  platform = jax.default_backend()
  native = _NATIVE.get(platform)
  if backend is not None and backend not in dynamo_grid.BACKENDS:
    raise InputError(f"backend {backend!r} unknown; available: "
                     f"{dynamo_grid.BACKENDS}.")
  if interpret is None:
    if backend is None:
      return None, None
    if native is None:  # CPU: the kernel only runs in interpret mode
      return backend, True
    if backend != native:
      raise InputError(
          f"kernel backend {backend!r} cannot compile on this {platform} "
          f"machine (its backend is {native!r}); pass backend={native!r}, "
          "or interpret=True to emulate it.")
    return native, False
  if interpret is False and backend is None:
    if native is None:
      raise InputError(
          f"kernel='pallas' with interpret=False needs a TPU or GPU; this "
          f"machine's JAX backend is {platform!r}. Pass interpret=True (or "
          "None) to run the kernel in interpret mode, or kernel='reference'.")
    return native, False
  return backend or native or "triton", interpret


def _check(ids_BxNxK, probs_BxNxK, seen_BxNxK, weights, u_B, kernel):
  if kernel not in KERNELS:
    raise InputError(f"kernel {kernel!r} unknown; available: {KERNELS}.")
  shape = tuple(ids_BxNxK.shape)
  if len(shape) != 3:
    raise InputError(f"ids must be [B, N, K], got shape {shape}.")
  for name, x in (("probs", probs_BxNxK), ("seen", seen_BxNxK)):
    if tuple(x.shape) != shape:
      raise InputError(f"{name} must have the ids' shape {shape}, got "
                       f"{tuple(x.shape)}.")
  b, n, k = shape
  if tuple(u_B.shape) != (b,):
    raise InputError(f"u must be [B={b}], got shape {tuple(u_B.shape)}.")
  if len(weights) != max(n - 1, 0):
    raise InputError(f"weights must hold one entry (array or None) per order "
                     f"2..{n}, got {len(weights)}.")
  for m, w in enumerate(weights, start=2):
    if w is not None and tuple(w.shape) != (b,) + (k,) * m:
      raise InputError(f"weights of order {m} must be {(b,) + (k,) * m}, got "
                       f"{tuple(w.shape)}.")
  if kernel == "pallas" and k ** n >= 1 << 24:
    raise InputError(f"K^N = {k}^{n} entries per grid is too large for the "
                     "kernel's float32 counts (< 2^24).")


def threshold_and_draw(ids_BxNxK: jax.Array, probs_BxNxK: jax.Array,
                       seen_BxNxK: jax.Array,
                       weights: Sequence[jax.Array | None], eps_b,
                       repetition_penalty, u_B: jax.Array, *,
                       blur: bool = True, otsu: bool = True,
                       greedy: bool = False, kernel: str = "pallas",
                       interpret=None, backend: str | None = None,
                       block_rows: int | None = None) -> GridDraws:
  """Steps 3-8 of Algorithm 1 for orders 2..N (order 1 is the caller's).

  Args:
    ids_BxNxK: int32 [B, N, K], each head's top-k token ids, descending.
    probs_BxNxK: float32 [B, N, K], the top-k marginals (each sums to 1).
    seen_BxNxK: bool [B, N, K], the id is in the row's history.
    weights: N-1 entries, for orders 2..N: float32 [B, K, ..., K] (m axes)
      co-occurrence weights (cooc.grid_weights), or None for no weighting.
    eps_b: float32 [], the back-off threshold.
    repetition_penalty: float32 [], >= 1.
    u_B: float32 [B], the uniform each row's tuple draw inverts the CDF with.
    blur, otsu, greedy: Algorithm 1's switches (see ops.grid).
    kernel: "pallas" (the fused kernel) or "reference" (its jnp reference,
      ops.grid.grid_threshold_draw_reference).
    interpret: Pallas only. None: compiled on TPU/GPU, interpret mode on
      CPU (with backend None, decided when lowering, so jax.export for
      "tpu" or "cuda" gets the compiled kernel); True: interpret mode (TPU
      semantics via pltpu.InterpretParams for backend "tpu"); False:
      compiled (an InputError on a machine without an accelerator unless
      `backend` names the target).
    backend: Pallas only. "tpu" or "triton"; None: the lowering platform's.
    block_rows: Pallas only, grid rows per kernel block (None: default).

  Returns:
    GridDraws.

  Raises:
    InputError: an unknown kernel or backend, a Pallas request this machine
      cannot run, or inputs of the wrong shapes.
  """
  weights = tuple(weights)
  _check(ids_BxNxK, probs_BxNxK, seen_BxNxK, weights, u_B, kernel)
  b, n, k = ids_BxNxK.shape
  eps_b = jnp.asarray(eps_b, jnp.float32)
  u_B = jnp.asarray(u_B, jnp.float32)
  # Per-head penalty factors; the op multiplies them out over the grid.
  div_BxNxK = jnp.where(seen_BxNxK, repetition_penalty, 1.0).astype(
      jnp.float32)
  if kernel == "pallas":
    backend, interpret = resolve_backend(backend, interpret)

    def order(probs, w, div):
      run = lambda backend, interpret: dynamo_grid.grid_threshold_draw(
          probs, w, div, u_B, eps_b, blur=blur, otsu=otsu, greedy=greedy,
          backend=backend, interpret=interpret, block_rows=block_rows)
      if backend is not None:
        return run(backend, interpret)
      # Chosen at lowering: every branch is traced, one is lowered.
      return jax.lax.platform_dependent(
          tpu=lambda: run("tpu", False), cuda=lambda: run("triton", False),
          rocm=lambda: run("triton", False),
          default=lambda: run("triton", True))
  else:
    def order(probs, w, div):
      return grid.grid_threshold_draw_reference(
          probs, w, div, u_B, eps_b, blur=blur, otsu=otsu, greedy=greedy)

  passed = [jnp.ones((b,), jnp.bool_)]
  peaks = [jnp.zeros((b,), jnp.float32)]
  tuples, tuple_probs = [], []
  for m, w in zip(range(2, n + 1), weights):
    flat_B, prob_B, peak_B = order(probs_BxNxK[:, :m], w, div_BxNxK[:, :m])
    passed.append(peak_B > eps_b ** (m - 1))
    peaks.append(peak_B)
    tuples.append(grid.flat_to_tuple(flat_B, ids_BxNxK, m=m, k=k, n=n))
    tuple_probs.append(prob_B)
  passed_BxN = jnp.stack(passed, axis=1)
  m_B = jnp.max(jnp.where(passed_BxN, jnp.arange(1, n + 1), 1),
                axis=1).astype(jnp.int32)
  tokens_BxN = jnp.zeros((b, n), jnp.int32)
  joint_prob_B = jnp.zeros((b,), jnp.float32)
  for m, tuple_BxN, prob_B in zip(range(2, n + 1), tuples, tuple_probs):
    tokens_BxN = jnp.where((m_B == m)[:, None], tuple_BxN, tokens_BxN)
    joint_prob_B = jnp.where(m_B == m, prob_B, joint_prob_B)
  return GridDraws(m_B=m_B, tokens_BxN=tokens_BxN.astype(jnp.int32),
                   joint_prob_B=joint_prob_B, passed_BxN=passed_BxN,
                   peak_BxN=jnp.stack(peaks, axis=1))
