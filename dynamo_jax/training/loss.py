"""The multi-token loss: head i predicts token t+i, never across documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax.model.config import PythiaConfig
from dynamo_jax.model.pythia import Params, Pythia


def _shift_left(x_BxT, shift: int):
  """x[:, t + shift], zero (False) past the end of the row."""
  b = x_BxT.shape[0]
  return jnp.concatenate([x_BxT[:, shift:], jnp.zeros((b, shift), x_BxT.dtype)],
                         axis=1)


def shifted_targets(tokens_BxT, segment_ids_BxT, shift: int,
                    loss_mask_BxT=None):
  """Targets tokens[t + shift] and a mask that is False where t + shift runs
  off the row, crosses into another document, or sits on padding (segment 0);
  with `loss_mask_BxT` (bool, True on the tokens that count as targets: an
  instruction's response) also where token t + shift is not one of those."""
  targets_BxT = _shift_left(tokens_BxT, shift)
  seg_next_BxT = _shift_left(segment_ids_BxT, shift)
  mask_BxT = (segment_ids_BxT != 0) & (seg_next_BxT == segment_ids_BxT)
  if loss_mask_BxT is not None:
    mask_BxT = mask_BxT & _shift_left(loss_mask_BxT.astype(bool), shift)
  return targets_BxT, mask_BxT


def token_nll(logits_BxTxV, targets_BxT):
  """-log p(target) per position, float32 [B, T] (any leading axes: the
  vocabulary is the last): log-sum-exp minus the target's logit, picked by
  integer label (no one-hot over V). The one NLL of training, perplexity and
  continuation quality."""
  logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None],
                                   axis=-1)[..., 0]
  return logz_BxT - picked_BxT


def head_losses(config: PythiaConfig, params: Params, tokens_BxT,
                segment_ids_BxT=None, loss_mask_BxT=None):
  """Mean NLL of each token head, float32 [N], and valid target counts [N].

  L_i = -(1/|valid|) sum_t log p_i(x_{t+i} | x_{<=t}); a target is valid when
  it lies in position t's segment and, given `loss_mask_BxT` (bool [B, T],
  instruction tuning's response tokens), when loss_mask[t + i]. Logits are recomputed in
  the backward pass (remat) so N x [B, T, V] float32 never sit in memory.
  """
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones_like(tokens_BxT)
  t = tokens_BxT.shape[1]
  positions_BxT = jnp.broadcast_to(jnp.arange(t), tokens_BxT.shape)
  model = Pythia(config)
  hiddens, _ = model.apply({"params": params}, tokens_BxT, positions_BxT,
                           all_heads=True, method=Pythia.hidden_states)

  @jax.checkpoint
  def head_nll_sum(params, hidden_BxTxD, targets_BxT, mask_BxT):
    logits_BxTxV = model.apply({"params": params}, hidden_BxTxD,
                               method=Pythia.unembed)
    return jnp.sum(token_nll(logits_BxTxV, targets_BxT) * mask_BxT)

  losses, counts = [], []
  for i, hidden_BxTxD in enumerate(hiddens, start=1):
    targets_BxT, mask_BxT = shifted_targets(tokens_BxT, segment_ids_BxT, i,
                                            loss_mask_BxT)
    count = jnp.sum(mask_BxT).astype(jnp.float32)
    losses.append(head_nll_sum(params, hidden_BxTxD, targets_BxT, mask_BxT)
                  / jnp.maximum(count, 1.0))
    counts.append(count)
  return jnp.stack(losses), jnp.stack(counts)


def mean_head_losses(config: PythiaConfig, params: Params, batches):
  """Mean NLL of each head over all valid targets of `batches` (each a dict
  with "tokens", "segment_ids" and optionally "loss_mask"), float64 [N], and
  the valid target counts [N]: `head_losses` weighted by its counts, so
  rows and batches count by their targets, not equally."""
  fn = jax.jit(lambda p, *rows: head_losses(config, p, *rows))
  total_N, count_N = 0.0, 0.0
  for batch in batches:
    rows = (batch["tokens"], batch["segment_ids"]) + (
        (batch["loss_mask"],) if "loss_mask" in batch else ())
    losses_N, counts_N = (np.asarray(x, np.float64) for x in fn(params, *rows))
    total_N = total_N + losses_N * counts_N
    count_N = count_N + counts_N
  return total_N / np.maximum(count_N, 1.0), count_N
