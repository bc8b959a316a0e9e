"""DynamoLM (lm-evaluation-harness) against brute-force numpy: log-likelihoods
(is_greedy included), rolling windows, a local multiple-choice task through
lm_eval.simple_evaluate (object and registered-name forms), generate_until's
stop strings, and the bad inputs (options, unknown task, lm-eval missing).

Offline: the embedded default model, and a task written here as jsonl + YAML.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import dynamo_jax
from dynamo_jax.errors import DynamoError, InputError
from dynamo_jax.evaluation import harness

import lm_eval  # the eval extra, part of the test environment
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

TASK = "dynamo_local_mc"
QUESTIONS = [
    ("And God said, Let there be", ["light", "darkness", "water"]),
    ("In the beginning God created the heaven and the", ["earth", "sea", "king"]),
    ("To be, or not to", ["be", "see", "go"]),
    ("Of Mans first disobedience, and the", ["fruit", "stone", "night"]),
    ("The LORD is my", ["shepherd", "brother", "horse"]),
    ("O Romeo, Romeo, wherefore art thou", ["Romeo", "here", "gone"]),
]


@pytest.fixture(scope="module")
def model():
  return dynamo_jax.load(None)


@pytest.fixture(scope="module")
def lm(model):
  return harness.DynamoLM(pretrained=model, batch_size=4)


# References run one row at a time, padded on the right to one length (one
# compile) with a token DynamoLM never pads with: causal attention keeps it
# out of the positions read, and a leak would show as a mismatch.
REF_LEN, REF_PAD = 128, 1


def _softmax_logp(model, ids) -> np.ndarray:
  """float64 [T, V] log-softmax of head 1's logits for one row of T tokens."""
  assert len(ids) <= REF_LEN
  row = np.full((1, REF_LEN), REF_PAD, np.int32)
  row[0, :len(ids)] = ids
  logits = np.asarray(dynamo_jax.forward(model.config, model.params, row)[0],
                      np.float64)[:len(ids)]
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _reference(model, context: str, continuation: str, max_length: int):
  """(sum log p, is_greedy) the long way: encode whole and split at the
  context's length (EOS for an empty context), cut from the left."""
  tok = model.tokenizer
  if context:
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
  else:
    ctx, cont = [model.config.eos_token_id], tok.encode(continuation)
  whole = (ctx + cont)[-(max_length + 1):]
  logp = _softmax_logp(model, whole[:-1])
  rows = range(len(whole) - 1 - len(cont), len(whole) - 1)
  total = sum(logp[t, whole[t + 1]] for t in rows)
  return total, all(int(np.argmax(logp[t])) == whole[t + 1] for t in rows)


def _greedy_words(model, context: str, steps: int) -> str:
  """The argmax continuation of `context`, token by token."""
  ids = model.tokenizer.encode(context)
  for _ in range(steps):
    ids.append(int(np.argmax(_softmax_logp(model, ids)[-1])))
  return model.tokenizer.decode(ids[len(model.tokenizer.encode(context)):])


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_numpy(model):
  lm = harness.DynamoLM(pretrained=model, batch_size=4, max_length=64)
  greedy_ctx = "And God said, Let there be light: and there was"
  long_ctx = " ".join(["and the earth was without form, and void"] * 12)
  pairs = [("And God said, Let there be", " light"),
           ("", "In the beginning God created the heaven"),
           ("To be, or not to be", ", that is the question"),
           (greedy_ctx, _greedy_words(model, greedy_ctx, 3)),
           (long_ctx, " and darkness was upon the face of the deep")]
  assert len(model.tokenizer.encode(long_ctx)) > 64  # cut from the left
  got = lm.loglikelihood(_requests("loglikelihood", pairs))
  want = [_reference(model, c, x, 64) for c, x in pairs]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want],
                             rtol=1e-5, atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert want[3][1] and not want[0][1]  # both answers of is_greedy seen


def test_loglikelihood_rolling_matches_numpy(model, lm):
  text = ("In the beginning God created the heaven and the earth. And the "
          "earth was without form, and void; and darkness was upon the face "
          "of the deep. ") * 3
  ids = model.tokenizer.encode(text)
  eos = model.config.eos_token_id
  # One window (the string fits): every token predicted from EOS + before.
  logp = _softmax_logp(model, [eos] + ids[:-1])
  one = sum(logp[t, ids[t]] for t in range(len(ids)))
  # Windows of 32: the first predicts 32 tokens from EOS + 31; each later
  # one predicts the next (up to 32) tokens from the 32 before its last.
  small = harness.DynamoLM(pretrained=model, batch_size=4, max_length=32)
  many, done = 0.0, 0
  while done < len(ids):
    end = min(done + 32, len(ids))
    inputs = ([eos] + ids[:end - 1])[-32:]
    logp = _softmax_logp(model, inputs)
    many += sum(logp[32 - (end - t), ids[t]] for t in range(done, end))
    done = end
  assert len(ids) > 2 * 32
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                           [(text,), ("",)]))
  np.testing.assert_allclose(got, [one, 0.0], rtol=1e-5, atol=1e-4)
  got = small.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                              [(text,)]))
  np.testing.assert_allclose(got, [many], rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def task_dir(model, tmp_path_factory):
  """A 3-choice task whose answer is the brute-force best choice for half of
  the questions and another choice for the rest: accuracy 0.5."""
  d = tmp_path_factory.mktemp("tasks")
  rows = []
  for i, (question, choices) in enumerate(QUESTIONS):
    scores = [_reference(model, question, " " + c, 512)[0] for c in choices]
    best = int(np.argmax(scores))
    rows.append({"question": question, "choices": choices,
                 "answer": best if i % 2 == 0 else (best + 1) % 3})
  data = d / "mc.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "mc.yaml").write_text(
      f"task: {TASK}\n"
      "dataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
      "test_split: test\n"
      "output_type: multiple_choice\n"
      "doc_to_text: question\n"
      "doc_to_choice: choices\n"
      "doc_to_target: answer\n"
      "metric_list:\n  - metric: acc\n    aggregation: mean\n"
      "    higher_is_better: true\n")
  return str(d)


def test_simple_evaluate_multiple_choice(lm, task_dir):
  manager = TaskManager(include_path=task_dir, include_defaults=False)
  out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager,
                                log_samples=False, bootstrap_iters=0)
  assert out["results"][TASK]["acc,none"] == pytest.approx(0.5)
  from dynamo_jax.default_model import default_model_dir
  out = lm_eval.simple_evaluate(
      model=harness.MODEL_NAME, task_manager=manager, tasks=[TASK],
      model_args=f"pretrained={default_model_dir()},batch_size=4,eps_b=0.25",
      log_samples=False, bootstrap_iters=0)
  assert out["results"][TASK]["acc,none"] == pytest.approx(0.5)
  assert out["config"]["dynamo_jax_options"]["eps_b"] == 0.25


def _generate(lm, contexts_and_kwargs):
  return lm.generate_until(_requests("generate_until", contexts_and_kwargs))


def test_generate_until_ar_greedy_and_stop_strings(model):
  lm = harness.DynamoLM(pretrained=model, batch_size=1)
  context = "And God said, Let"
  full, = _generate(lm, [(context, {"until": [], "max_gen_toks": 16})])
  ids = np.asarray([model.tokenizer.encode(context)], np.int32)
  tokens = dynamo_jax.generate(model.config, model.params, ids,
                               max_new_tokens=16, greedy=True).tokens[0]
  tokens = list(tokens)
  tokens = tokens[:tokens.index(0)] if 0 in tokens else tokens
  assert full == model.tokenizer.decode(tokens) and len(full) > 10
  stop = full[len(full) // 2:len(full) // 2 + 2]
  cut, = _generate(lm, [(context, {"until": [stop, "zzz"],
                                   "max_gen_toks": 16, "do_sample": False})])
  assert cut == full[:full.index(stop)] and len(cut) < len(full)


def test_generate_until_dynamo_sampling(model):
  """Sampling with model_args-style strings: a request's text does not
  depend on its batch, and a stop string cuts that same text."""
  lm = harness.DynamoLM(pretrained=model, batch_size=2, mode="dynamo",
                        eps_b="0.3", temperature="0.8", seed="3")
  context, other = "The LORD is my shepherd;", "The LORD is my light;"
  tok = model.tokenizer
  assert len(tok.encode(context)) == len(tok.encode(other))  # one batch
  sample = {"do_sample": True, "max_gen_toks": 12}
  full, = _generate(lm, [(context, sample)])
  assert full
  stop = full[len(full) // 2]
  _, cut = _generate(lm, [(other, sample), (context, {**sample,
                                                      "until": [stop]})])
  assert cut == full[:full.index(stop)]


def test_options_parsed_and_refused(model):
  from dynamo_jax.evaluation import harness_lm
  from dynamo_jax.evaluation.harness import DynamoLM
  assert DynamoLM is harness_lm.DynamoLM
  lm = harness.DynamoLM(pretrained=model, eps_b="0.3", greedy="false",
                        seed="7", mode="verified", batch_size="4",
                        max_gen_toks=32, use_cooc="no")
  assert (lm.options["eps_b"], lm.options["greedy"], lm.options["seed"],
          lm.options["mode"], lm.batch_size, lm.options["use_cooc"]) == (
              0.3, False, 7, "verified", 4, False)
  for bad, name in [({"eps_b": "abc"}, "eps_b"), ({"eps_b": 2}, "eps_b"),
                    ({"batch_size": "auto"}, "batch_size"),
                    ({"mode": "fast"}, "mode"), ({"greedy": "maybe"}, "greedy"),
                    ({"max_length": 10**6}, "max_length"),
                    ({"top_p": 0.9}, "top_p"), ({"device": "cuda"}, "device")]:
    with pytest.raises(InputError, match=name):
      harness.DynamoLM(pretrained=model, **bad)
  settings = lm._settings  # pylint: disable=protected-access
  assert settings({}) == ((False, 0.7, 32), [])  # the options' greedy=false
  assert settings({"temperature": 0.0, "until": "x"}) == ((True, 0.7, 32), ["x"])
  assert settings({"do_sample": True, "max_new_tokens": 9}) == ((False, 0.7, 9), [])
  assert settings({"do_sample": False, "top_p": 0.9}) == ((True, 0.7, 32), [])
  assert settings({"temperature": 0.5}) == ((False, 0.5, 32), [])
  with pytest.raises(InputError, match="top_p"):
    _generate(harness.DynamoLM(pretrained=model),
              [("Hi", {"do_sample": True, "temperature": 0.5, "top_p": 0.9})])


def _cli(capsys, *argv) -> tuple[int, str, str]:
  from dynamo_jax.cli import main
  try:
    code = main(["eval", "lm-eval", *argv])
  except SystemExit as e:  # argparse: the arguments here are all valid
    pytest.fail(f"`eval lm-eval` is not a subcommand (exit {e.code}): "
                "dynamo_jax/evaluation/cli.py lists 'harness' in SUBCOMMANDS "
                "and dynamo_jax/cli.py registers evaluation.cli.add_parser")
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_runs_a_local_task(capsys, task_dir, tmp_path):
  out_file = tmp_path / "results.json"
  code, out, _ = _cli(capsys, "--tasks", TASK, "--include-path", task_dir,
                      "--batch-size", "4", "--json", "--out", str(out_file))
  assert code == 0
  printed = json.loads(out.strip().splitlines()[-1])
  assert printed["results"][TASK]["acc,none"] == pytest.approx(0.5)
  assert json.loads(out_file.read_text()) == printed


def test_cli_unknown_task_is_one_line(capsys, task_dir):
  code, out, err = _cli(capsys, "--tasks", f"{TASK},no_such_task_xyz",
                        "--include-path", task_dir)
  assert code == 2 and not out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert "no_such_task_xyz" in lines[0] and "lm-eval ls tasks" in lines[0]
  assert TASK not in lines[0].split(";")[0]


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "lm_eval", None)
  with pytest.raises(DynamoError, match=r"pip install -e \.\[eval\]"):
    harness.DynamoLM  # pylint: disable=pointless-statement
  code, _, err = _cli(capsys, "--tasks", "piqa")
  assert code == 2
  assert err.strip() == f"error: {harness.MISSING}"


def test_import_is_cheap_and_registers():
  """Importing harness registers the name without importing lm-eval's
  models, tasks, evaluator or torch (a fresh interpreter)."""
  import subprocess
  code = ("import sys, dynamo_jax.evaluation.harness\n"
          "from lm_eval.api.registry import model_registry as r\n"
          "heavy = [m for m in ('lm_eval.api.model', 'lm_eval.evaluator', "
          "'lm_eval.tasks', 'torch', 'dynamo_jax.evaluation.harness_lm') "
          "if m in sys.modules]\n"
          "print(heavy, 'dynamo_jax' in r, 'hf' in r)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split("\n")[0] == "[] True True"
