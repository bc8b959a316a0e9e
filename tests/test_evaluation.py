"""Multi-token perplexity against a brute-force numpy computation.

The reference scores every position t with its own forward pass over exactly
the context the windowing rule gives it, then takes log-softmax, the NLLs, the
joint's product-of-marginals and the means in numpy, with no windows,
batching or masking to share bugs with the code under test.
"""

import math

import jax
import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.errors import InputError
from dynamo_jax.evaluation import evaluate, head_nll, make_windows

EOS = 0


def _model(n=3):
  # Prime sizes (head_dim 8 is even for rotary) so no transpose can hide.
  config = dynamo_jax.PythiaConfig(vocab_size=211, hidden_size=24,
                                   num_layers=2, num_heads=3,
                                   intermediate_size=97,
                                   max_position_embeddings=101,
                                   num_token_heads=n)
  params = dynamo_jax.init_params(config, jax.random.PRNGKey(1))
  # Larger weights than the 0.02 init, so perplexities differ between heads.
  params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params)
  return config, params


def _stream(config, lengths, seed=0):
  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(1, config.vocab_size, size=l - 1), EOS)
          for l in lengths]
  return np.concatenate(docs), docs


def _context_start(t, window, stride):
  """Start of the window that scores position t (the one with most context)."""
  if t < window:
    return 0
  return int(math.ceil((t - window + 1) / stride) * stride)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reference(config, params, docs, window, stride):
  n = config.num_token_heads
  per_head = [[] for _ in range(n)]
  joint = [[] for _ in range(n)]
  for doc in docs:
    for t in range(doc.size - 1):
      a = _context_start(t, window, stride)
      ctx = doc[a:t + 1][None, :]
      logits = np.asarray(dynamo_jax.forward(config, params, ctx,
                                             all_heads=True), np.float64)
      logp = _log_softmax(logits[:, 0, -1, :])   # [N, V]
      nll = [-logp[h, doc[t + h + 1]] if t + h + 1 < doc.size else None
             for h in range(n)]
      for h in range(n):
        if nll[h] is not None:
          per_head[h].append(nll[h])
          joint[h].append(np.mean(nll[:h + 1]))
  out = {f"ppl_{h + 1}": math.exp(np.mean(per_head[h])) for h in range(n)}
  out.update({f"ppl_1:{h + 1}": math.exp(np.mean(joint[h]))
              for h in range(1, n)})
  return out


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5)])
def test_matches_brute_force(window, stride):
  config, params = _model()
  stream, docs = _stream(config, [40, 3, 17, 2])
  got = evaluate(config, params, stream, eos_id=EOS, window=window,
                 stride=stride, batch_size=3)
  want = _reference(config, params, docs, window, stride)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-5), key
  assert got["positions"] == sum(d.size - 1 for d in docs)
  # Heads disagree, so a head/target mix-up could not pass.
  assert len({round(got[k], 3) for k in want}) == len(want)


def test_windows_score_each_position_once():
  for length, window, stride in [(1, 4, 4), (2, 4, 4), (9, 4, 4), (9, 4, 1),
                                 (30, 7, 3), (8, 8, 8)]:
    seen = []
    for w in make_windows([length], window, stride):
      seen.extend(w.start + t for t in range(w.first, w.last))
      assert w.first >= 0 and w.last <= window
    assert seen == list(range(length - 1)), (length, window, stride)


def test_nll_shape_and_nan_past_document_end():
  config, params = _model()
  stream, docs = _stream(config, [5, 4])
  nll = head_nll(config, params, stream, eos_id=EOS, window=8)
  assert nll.shape == (3, 4 + 3)
  # Head 3 at the last two positions of each document has no target.
  assert np.isnan(nll[2]).sum() == 4 and np.isnan(nll[0]).sum() == 0


def test_trailing_document_without_eos_and_errors():
  config, params = _model(n=2)
  stream, _ = _stream(config, [6])
  got = evaluate(config, params, np.append(stream, [5, 6, 7]), eos_id=EOS,
                 window=8)
  assert got["positions"] == 5 + 2
  with pytest.raises(InputError, match="stride"):
    evaluate(config, params, stream, eos_id=EOS, window=8, stride=9)
  with pytest.raises(InputError, match="no position"):
    evaluate(config, params, np.array([EOS, EOS]), eos_id=EOS, window=8)
