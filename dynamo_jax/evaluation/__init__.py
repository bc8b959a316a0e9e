"""Evaluation of DynaMo models: multi-token perplexity and the AR-vs-DynaMo
decoding benchmark.

  evaluate(config, params, stream, *, eos_id, window=256, stride=None)
      -> {"ppl_1", ..., "ppl_N", "ppl_1:2", ..., "ppl_1:N", "positions"}
  head_nll(...) -> float64 [N, P] per-position NLLs; perplexities(nll)
  bench.run_bench(model, prompts, ...) -> dict   (python -m dynamo_jax bench)
"""

from dynamo_jax.evaluation.perplexity import (evaluate, head_nll, make_windows,
                                              perplexities, split_documents)

__all__ = ["evaluate", "head_nll", "make_windows", "perplexities",
           "split_documents"]
