"""Evaluation of DynaMo models: multi-token perplexity and the AR-vs-DynaMo
decoding benchmark.

  evaluate(config, params, stream, *, eos_id, window=256, stride=None)
      -> {"ppl_1", ..., "ppl_N", "ppl_1:2", ..., "ppl_1:N", "positions"}
  head_nll(...) -> float64 [N, P] per-position NLLs; perplexities(nll)
  bench.run_bench(model, prompts, ...) -> dict   (python -m dynamo_jax bench)
  DynamoLM(pretrained=None, **options): the lm-eval model "dynamo_jax"
      (harness.py; python -m dynamo_jax eval lm-eval; needs the eval extra)
  completions.run_completions(model, prompts, *, out_dir, seeds=10,
      eps_b_grid=PAPER_EPS_B_GRID, ...) -> path (python -m dynamo_jax eval
      completions)
  judge.PairwiseJudge(base_url, model, ...).compare(question, a, b)
      -> "a" | "b" | "tie"; judging.judge_generations(path, out_dir, ...)
      -> summary (python -m dynamo_jax eval judge)
"""

from dynamo_jax.evaluation.perplexity import (evaluate, head_nll, make_windows,
                                              perplexities, split_documents)

__all__ = ["evaluate", "head_nll", "make_windows", "perplexities",
           "split_documents"]


def __getattr__(name):
  # lm-eval is an optional extra: imported on first use of DynamoLM only.
  if name == "DynamoLM":
    from dynamo_jax.evaluation import harness  # pylint: disable=import-outside-toplevel
    return harness.DynamoLM
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
