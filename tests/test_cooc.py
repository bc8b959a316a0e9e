"""Co-occurrence statistics: counting vs brute force, the table file, lookup."""

import argparse
import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import cooc
from dynamo_jax.cooc import cli as cooc_cli
from dynamo_jax.cooc import hashtrie
from dynamo_jax.cooc import keys as keys_lib
from dynamo_jax.errors import CheckpointError, DynamoError, InputError


def brute_counts(docs, max_order):
  """order -> Counter of n-gram tuples, counted document by document."""
  out = {m: collections.Counter() for m in range(1, max_order + 1)}
  for doc in docs:
    doc = [int(x) for x in doc]
    for m in out:
      for i in range(len(doc) - m + 1):
        out[m][tuple(doc[i:i + m])] += 1
  return out


def table_counts(table, m):
  ids = keys_lib.decode(table.keys[m], m, table.vocab_size)
  return {tuple(int(x) for x in row): int(c)
          for row, c in zip(ids, table.counts[m])}


def assert_matches_brute(table, docs, max_order, min_count):
  expect = brute_counts(docs, max_order)
  for m in range(2, max_order + 1):
    want = {k: v for k, v in expect[m].items() if v >= min_count}
    assert table_counts(table, m) == want, f"order {m}"
    assert table.positions[m] == sum(max(0, len(d) - m + 1) for d in docs)
  flat = np.concatenate([np.asarray(d, np.int64) for d in docs] + [[]])
  np.testing.assert_array_equal(
      table.unigram_counts,
      np.bincount(flat.astype(np.int64), minlength=table.vocab_size))
  assert table.total_tokens == flat.size


@pytest.fixture
def gen():
  return np.random.default_rng(0)


def random_docs(gen, vocab_size, num_docs, max_len):
  return [gen.integers(0, vocab_size, gen.integers(0, max_len + 1))
          for _ in range(num_docs)]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 10_000])
@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_counts_equal_brute_force(gen, chunk_tokens, min_count):
  # A small vocabulary so that n-grams repeat and pruning bites; chunks of
  # 1..7 tokens put most n-grams across chunk boundaries, and documents
  # (some empty) end inside chunks.
  docs = random_docs(gen, 5, 40, 25)
  table = cooc.count_ngrams(docs, 5, 4, min_count=min_count,
                            chunk_tokens=chunk_tokens)
  assert_matches_brute(table, docs, 4, min_count)
  assert table.num_documents == len(docs) and table.min_count == min_count


def test_merge_rounds_and_spills_are_exact(gen):
  docs = random_docs(gen, 6, 60, 40)
  with cooc.NgramCounter(6, 3, chunk_tokens=5,
                         memory_budget_bytes=600) as counter:
    for doc in docs:
      counter.add(doc)
    stats = counter.stats()
    table = counter.finish(2)
  assert all(s["merges"] > 1 and s["spills"] > 1 for s in stats.values())
  assert_matches_brute(table, docs, 3, 2)


def test_one_document_in_chunks(gen):
  doc = gen.integers(0, 4, 200)
  pieces = np.split(doc, np.sort(gen.integers(0, doc.size, 12)))
  table = cooc.count_stream(pieces, 4, 3, chunk_tokens=7)
  assert_matches_brute(table, [doc], 3, 1)
  assert table.num_documents == 1
  # The same pieces as separate documents lose exactly the n-grams that
  # span piece boundaries.
  split = cooc.count_ngrams(pieces, 4, 3, chunk_tokens=7)
  assert_matches_brute(split, pieces, 3, 1)
  assert split.positions[3] < table.positions[3]


def test_counter_mixes_pieces_and_documents(gen):
  doc_a, doc_b, doc_c = (gen.integers(0, 5, n) for n in (30, 1, 17))
  with cooc.NgramCounter(5, 3, chunk_tokens=4) as counter:
    counter.add(doc_a[:11], end_of_document=False)
    counter.add(doc_a[11:])
    counter.add(doc_b)
    counter.add(doc_c[:2], end_of_document=False)
    counter.add(doc_c[2:2], end_of_document=False)
    counter.add(doc_c[2:])
    table = counter.finish()
  assert_matches_brute(table, [doc_a, doc_b, doc_c], 3, 1)
  assert table.num_documents == 3


def test_bad_input_raises():
  with pytest.raises(InputError, match="outside the vocabulary"):
    cooc.count_ngrams([np.array([1, 5])], 5, 2)
  with pytest.raises(InputError, match="outside the vocabulary"):
    cooc.count_ngrams([np.array([-1, 2])], 5, 2)
  with pytest.raises(InputError, match="1-D"):
    cooc.count_ngrams([np.zeros((2, 2), np.int32)], 5, 2)
  with pytest.raises(InputError, match="min_count"):
    cooc.count_ngrams([np.array([1, 2])], 5, 2, min_count=0)


def test_key_overflow_is_a_clear_error():
  cooc.check_fits(50304, 4)  # Pythia's vocabulary: 4-grams fit in uint64
  with pytest.raises(InputError, match="largest order this vocabulary "
                     "allows is 4"):
    cooc.check_fits(50304, 5)
  with pytest.raises(InputError, match="do not fit one uint64 key"):
    cooc.NgramCounter(2**22, 3)
  with pytest.raises(InputError):
    cooc.NgramCounter(2**32 + 1, 2)


def test_keys_round_trip(gen):
  ids = gen.integers(0, 50304, (100, 4))
  keys = keys_lib.encode(ids, 50304)
  np.testing.assert_array_equal(keys_lib.decode(keys, 4, 50304), ids)
  stream = gen.integers(0, 50304, 50)
  np.testing.assert_array_equal(
      keys_lib.window_keys(stream, 3, 50304),
      keys_lib.encode(np.stack([stream[:-2], stream[1:-1], stream[2:]], 1),
                      50304))


# --- the table file ---------------------------------------------------------


@pytest.fixture
def small_table(gen):
  docs = random_docs(gen, 7, 30, 30)
  return cooc.count_ngrams(docs, 7, 3, min_count=2, corpus="random docs",
                           vocab_hash=cooc.vocab_hash({str(i): i
                                                       for i in range(7)}))


def test_save_load_round_trip(tmp_path, small_table):
  path = tmp_path / "sub" / "table.npz"
  small_table.save(path)
  small_table.save(path)  # replacing an existing file is fine
  assert os.listdir(tmp_path / "sub") == ["table.npz"]  # no temp files left
  back = cooc.load(path)
  for field in ("vocab_size", "max_order", "positions", "num_documents",
                "min_count", "vocab_hash", "corpus", "total_tokens",
                "pruning"):
    assert getattr(back, field) == getattr(small_table, field), field
  np.testing.assert_array_equal(back.unigram_counts, small_table.unigram_counts)
  for m in (2, 3):
    np.testing.assert_array_equal(back.keys[m], small_table.keys[m])
    np.testing.assert_array_equal(back.counts[m], small_table.counts[m])
  with np.load(path, allow_pickle=False) as npz:  # no pickled objects inside
    meta = json.loads(npz["metadata"].tobytes())
  assert meta["version"] == cooc.FORMAT_VERSION
  assert "below 2" in meta["pruning"]
  assert back.count(next(iter(table_counts(back, 3)))) >= 2
  assert back.count((7, 0)) == 0  # id outside the vocabulary
  with pytest.raises(InputError, match="orders 1..3"):
    back.count((0, 0, 0, 0))


def _rewrite(path, out, **changes):
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  meta = json.loads(arrays["metadata"].tobytes())
  for key, value in changes.items():
    if key in meta:
      meta[key] = value
    else:
      arrays[key] = value
  arrays["metadata"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  with open(out, "wb") as f:
    np.savez(f, **arrays)
  return out


def test_load_errors_name_the_problem(tmp_path, small_table):
  path = tmp_path / "t.npz"
  small_table.save(path)
  with pytest.raises(CheckpointError, match="no co-occurrence table"):
    cooc.load(tmp_path / "missing.npz")
  (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(CheckpointError, match="corrupt"):
    cooc.load(tmp_path / "garbage.npz")
  (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:300])
  with pytest.raises(CheckpointError, match="corrupt"):
    cooc.load(tmp_path / "cut.npz")
  with pytest.raises(CheckpointError, match="version 2; this dynamo_jax "
                     "reads version 1"):
    cooc.load(_rewrite(path, tmp_path / "v2.npz", version=2))
  with pytest.raises(CheckpointError, match="not a dynamo_jax"):
    cooc.load(_rewrite(path, tmp_path / "fmt.npz", format="other"))
  with open(tmp_path / "plain.npz", "wb") as f:
    np.savez(f, x=np.zeros(3))
  with pytest.raises(CheckpointError, match="no metadata"):
    cooc.load(tmp_path / "plain.npz")
  keys = small_table.keys[2][::-1].copy()
  with pytest.raises(CheckpointError, match="strictly increasing"):
    cooc.load(_rewrite(path, tmp_path / "unsorted.npz", keys_2=keys))
  with pytest.raises(CheckpointError, match="do not form a table"):
    cooc.load(_rewrite(path, tmp_path / "short.npz",
                       counts_3=np.zeros(1, np.uint32)))
  assert issubclass(CheckpointError, DynamoError)


def test_vocab_hash():
  vocab = {"a": 0, "b": 1, "c": 2}
  h = cooc.vocab_hash(vocab)
  assert h.startswith("sha256:")
  assert cooc.vocab_hash(dict(reversed(vocab.items()))) == h  # order-free
  assert cooc.vocab_hash({"a": 0, "b": 2, "c": 1}) != h
  assert cooc.vocab_hash({"a": 0, "b": 1, "d": 2}) != h

  class Tok:

    def get_vocab(self):
      return vocab

  assert cooc.vocab_hash(Tok()) == h
  with pytest.raises(InputError, match="get_vocab"):
    cooc.vocab_hash(["a", "b"])


def test_check_compatible(small_table):
  good = small_table.vocab_hash
  cooc.check_compatible(small_table, vocab_hash=good, vocab_size=7,
                        num_heads=3)
  cooc.check_compatible(small_table, vocab_size=16)  # padded model vocab
  with pytest.raises(CheckpointError, match="another vocabulary"):
    cooc.check_compatible(small_table, vocab_hash=cooc.vocab_hash({"x": 0}))
  with pytest.raises(CheckpointError, match="larger than the model"):
    cooc.check_compatible(small_table, vocab_size=6)
  with pytest.raises(CheckpointError, match="needs n-gram orders up to 4.*"
                     "--max-order 4"):
    cooc.check_compatible(small_table, num_heads=4)
  small_table.vocab_hash = None
  with pytest.raises(CheckpointError, match="records no vocabulary hash"):
    cooc.check_compatible(small_table, vocab_hash=good)


def test_t3_model_needs_trigrams(gen):
  bigrams_only = cooc.count_ngrams(random_docs(gen, 5, 5, 9), 5, 2)
  with pytest.raises(CheckpointError, match="stops at order 2"):
    cooc.check_compatible(bigrams_only, num_heads=3)


# --- lookup -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lookup_table():
  gen = np.random.default_rng(7)
  # Zipf-like ids so some n-grams are frequent (long sub-tables) and pruning
  # with min_count=2 leaves many absent.
  p = 1.0 / np.arange(1, 31)
  p /= p.sum()
  docs = [gen.choice(30, gen.integers(1, 400), p=p) for _ in range(40)]
  table = cooc.count_ngrams(docs, 30, 3, min_count=2)
  return table, cooc.to_device(table)


@pytest.mark.parametrize("m_heads", [2, 3])
@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_grid_weights_match_numpy(lookup_table, m_heads, k, alpha):
  table, arrays = lookup_table
  gen = np.random.default_rng(k * 10 + m_heads)
  ids = gen.integers(0, 30, (3, m_heads, k)).astype(np.int32)
  ids[1, 0, 0] = 29 + 5  # beyond the table's vocabulary: weight 0
  ids[2, -1, 1] = -3
  fn = jax.jit(cooc.grid_weights)
  got = np.asarray(fn(arrays, jnp.asarray(ids), alpha))
  want = cooc.grid_weights_numpy(table, ids, alpha)
  assert got.shape == (3,) + (k,) * m_heads and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert np.array_equal(got == 0, want == 0)  # absent means exactly 0
  assert (want == 0).any() and (want > 0).any()
  assert np.all(got[1, 0] == 0) and np.all(got[2][(slice(None),) * (
      m_heads - 1) + (1,)] == 0)


@pytest.mark.parametrize("vocab_size", [5, 30])
def test_out_of_range_ids_weigh_zero(vocab_size):
  # With 5 ids nearly every n-gram is present, so an out-of-range id that
  # reached a real slot would show.
  gen = np.random.default_rng(vocab_size)
  table = cooc.count_ngrams(random_docs(gen, vocab_size, 20, 60),
                            vocab_size, 3)
  arrays = cooc.to_device(table)
  ids = gen.integers(-3, vocab_size + 4, (16, 3, 8))
  got = np.asarray(jax.jit(cooc.grid_weights)(arrays, jnp.asarray(ids)))
  np.testing.assert_allclose(got, cooc.grid_weights_numpy(table, ids),
                             rtol=1e-6, atol=0)
  bad = (ids < 0) | (ids >= vocab_size)
  for b, i, j in zip(*np.nonzero(bad)):
    index = [b, slice(None), slice(None), slice(None)]
    index[1 + i] = j
    assert np.all(got[tuple(index)] == 0)


def test_absent_ngrams_are_exactly_zero(lookup_table):
  table, arrays = lookup_table
  present = next(iter(table_counts(table, 3)))
  grid = np.asarray(cooc.grid_weights(arrays, jnp.asarray(
      [[[present[0], 0], [present[1], 0], [present[2], 0]]], jnp.int32)))
  want = cooc.grid_weights_numpy(table, np.asarray(
      [[[present[0], 0], [present[1], 0], [present[2], 0]]]))
  assert grid[0, 0, 0, 0] > 0
  for idx in np.ndindex(2, 2, 2):
    ngram = tuple((present[i], 0)[j] for i, j in enumerate(idx))
    assert (grid[(0,) + idx] == 0) == (table.count(ngram) == 0)
  np.testing.assert_allclose(grid, want, rtol=1e-6)


def test_cuckoo_growth_path_is_exact(lookup_table, monkeypatch):
  # One insertion round leaves many entries unplaced, so most sub-tables
  # take the grow-and-move path.
  monkeypatch.setattr(hashtrie, "_MAX_ROUNDS", 1)
  table, _ = lookup_table
  arrays = cooc.to_device(table)
  ids = np.random.default_rng(3).integers(0, 30, (2, 3, 8))
  np.testing.assert_allclose(
      np.asarray(cooc.grid_weights(arrays, jnp.asarray(ids))),
      cooc.grid_weights_numpy(table, ids), rtol=1e-6)


def test_device_table_is_the_sampler_interface(lookup_table):
  table, _ = lookup_table
  device = cooc.device_table(table)
  assert cooc.device_table(table) is device and device.max_order == 3
  ids = np.random.default_rng(4).integers(0, 30, (2, 3, 5))

  @jax.jit
  def step(cooc, ids_BxMxK):  # the table is an argument: a pytree
    return cooc.grid_weights(ids_BxMxK, 0.5)

  np.testing.assert_allclose(np.asarray(step(device, jnp.asarray(ids))),
                             cooc.grid_weights_numpy(table, ids, 0.5),
                             rtol=1e-6)
  table.check_compatible(vocab_size=30, num_heads=3)
  with pytest.raises(CheckpointError, match="orders up to 4"):
    table.check_compatible(num_heads=4)


def test_grid_weights_rejects_too_many_heads(lookup_table):
  table, _ = lookup_table
  arrays = cooc.to_device(table, max_order=2)
  with pytest.raises(InputError, match="M = 3"):
    cooc.grid_weights(arrays, jnp.zeros((1, 3, 4), jnp.int32))


# --- command line -----------------------------------------------------------


def _args(*argv):
  parser = argparse.ArgumentParser()
  cooc_cli.add_parser(parser.add_subparsers(dest="command"))
  return parser.parse_args(["cooc", *argv])


def test_cli_token_files(tmp_path, gen, capsys):
  a = gen.integers(0, 9, 300).astype(np.uint16)
  b = gen.integers(0, 9, 50).astype(np.uint32)
  np.save(tmp_path / "a.npy", a)
  b.astype(np.uint16).tofile(tmp_path / "b.bin")
  out = tmp_path / "t.npz"
  args = _args("--data", str(tmp_path / "a.npy"), str(tmp_path / "b.bin"),
               "--out", str(out), "--vocab-size", "9", "--max-order", "3",
               "--doc-sep", "0", "--min-count", "2")
  assert args.func is cooc_cli.run
  args.func(args)
  err = capsys.readouterr().err
  assert "100%" in err and "wrote" in err
  table = cooc.load(out)
  # Each file is a stream cut into documents after every 0.
  docs = []
  for ids in (a, b):
    docs += [d for d in np.split(ids, np.flatnonzero(ids == 0) + 1) if d.size]
  assert_matches_brute(table, docs, 3, 2)
  assert table.vocab_hash is None and table.corpus == "a.npy, b.bin"
  with pytest.raises(InputError, match="--force"):
    cooc_cli.run(args)


def _word_tokenizer(directory):
  # pylint: disable=import-outside-toplevel
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return vocab


def test_cli_text_files_and_tokenizer_hash(tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  vocab = _word_tokenizer(tmp_path / "tok")
  (tmp_path / "a.txt").write_text("the cat sat\n\non the mat\n")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"body": "the cat sat on the mat"}) + "\n" +
      json.dumps({"body": "the dog"}) + "\n")
  args = _args("--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
               "--tokenizer", str(tmp_path / "tok"), "--text-key", "body",
               "--out", str(tmp_path / "t.npz"), "--corpus", "toy")
  cooc_cli.run(args)
  table = cooc.load(tmp_path / "t.npz")
  docs = [[1, 2, 3], [4, 1, 5], [1, 2, 3, 4, 1, 5], [1, 0]]
  assert_matches_brute(table, docs, 3, 1)
  assert table.corpus == "toy" and table.vocab_size == 6
  # The hash the sampler computes from an HF tokenizer matches.
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
  assert table.vocab_hash == cooc.vocab_hash(hf) == cooc.vocab_hash(vocab)
  cooc.check_compatible(table, vocab_hash=cooc.vocab_hash(hf), num_heads=3)


def test_cli_errors(tmp_path):
  (tmp_path / "a.txt").write_text("x\n")
  with pytest.raises(InputError, match="needs --tokenizer"):
    cooc_cli.run(_args("--data", str(tmp_path / "a.txt"), "--out",
                       str(tmp_path / "t.npz")))
  with pytest.raises(InputError, match="no data file"):
    cooc_cli.run(_args("--data", str(tmp_path / "nope.npy"), "--out",
                       str(tmp_path / "t.npz")))
  np.save(tmp_path / "a.npy", np.arange(5))
  with pytest.raises(InputError, match="--vocab-size"):
    cooc_cli.run(_args("--data", str(tmp_path / "a.npy"), "--out",
                       str(tmp_path / "t.npz")))
  with pytest.raises(InputError, match="outside the vocabulary"):
    cooc_cli.run(_args("--data", str(tmp_path / "a.npy"), "--out",
                       str(tmp_path / "t.npz"), "--vocab-size", "4"))
  assert not os.path.exists(tmp_path / "t.npz")
