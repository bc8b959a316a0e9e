"""The training data pipeline: packing, order, resume, sharding, sources."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dynamo_jax.data import DataConfig, DataError, make_batches
from dynamo_jax.errors import ConfigError

EOS = 200  # Above every character id of CharTokenizer, so it is unambiguous.


class CharTokenizer:
  """One id per character: a document can be read back from its tokens."""

  eos_token_id = EOS

  def encode(self, text):
    return [ord(c) for c in text]


def make_docs(n, seed=0, max_len=40):
  """Distinct documents: an index, then up to max_len random characters (so
  some span several rows)."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    body = "".join(rng.choice(list("abcdefgh "), rng.integers(0, max_len)))
    docs.append(f"{i}:{body}".strip())
  return docs


def collect(it, limit=10_000):
  batches = []
  for batch in it:
    batches.append(batch)
    if len(batches) == limit:
      break
  return batches


def stream(batches):
  """All non-padding tokens, in order."""
  return [int(t) for b in batches
          for t in b["tokens"][b["segment_ids"] > 0]]


def split_docs(tokens):
  """Documents (as text) from a token stream of documents + EOS."""
  docs, current = [], []
  for t in tokens:
    if t == EOS:
      docs.append("".join(map(chr, current)))
      current = []
    else:
      current.append(t)
  assert not current, "the stream must end with EOS"
  return docs


def assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


# ---- sources on disk ---------------------------------------------------------

def write_text_files(directory, docs):
  os.makedirs(directory, exist_ok=True)
  for i, doc in enumerate(docs):
    with open(os.path.join(directory, f"doc{i:04d}.txt"), "w") as f:
      f.write(doc)
  return str(directory)


def write_lines(path, docs):
  with open(path, "w") as f:
    f.write("\n\n".join(docs) + "\n")  # Blank lines between: skipped.
  return str(path)


def write_jsonl(path, docs):
  with open(path, "w") as f:
    for i, doc in enumerate(docs):
      f.write(json.dumps({"id": i, "body": doc}) + "\n")
  return str(path)


def write_tokens(path, docs, dtype):
  ids = np.concatenate([np.asarray(CharTokenizer().encode(d) + [EOS])
                        for d in docs]).astype(dtype)
  if path.endswith(".npy"):
    np.save(path, ids)
  else:
    ids.tofile(path)
  return path


@pytest.fixture(scope="module")
def docs():
  return make_docs(40)


@pytest.fixture(scope="module")
def configs(tmp_path_factory, docs):
  """One DataConfig per file source kind, all holding `docs`."""
  root = tmp_path_factory.mktemp("data")
  half = len(docs) // 2
  return {
      "text": DataConfig(source="text",
                         paths=(write_text_files(root / "txt", docs),)),
      "lines": DataConfig(source="text", one_doc_per_line=True, paths=(
          write_lines(root / "a.txt", docs[:half]),
          write_lines(root / "b.txt", docs[half:]))),
      "jsonl": DataConfig(source="jsonl", field="body",
                          paths=(write_jsonl(root / "d.jsonl", docs),)),
      "npy": DataConfig(source="tokens", paths=(
          write_tokens(str(root / "t.npy"), docs, np.uint16),)),
      "bin": DataConfig(source="tokens", token_dtype="uint32", paths=(
          write_tokens(str(root / "t0.bin"), docs[:half], np.uint32),
          write_tokens(str(root / "t1.bin"), docs[half:], np.uint32))),
  }


# ---- a real TFDS dataset, built from local text ----------------------------

class DynamoDataTestDocs(tfds.core.GeneratorBasedBuilder):
  """A tiny text dataset built the way any tfds dataset is (ArrayRecord)."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE_FILE = None  # Set by the fixture: a local text, one document a line.

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Local data: nothing to download.
    with open(self.SOURCE_FILE) as f:
      lines = f.read().splitlines()
    return {"train": self._generate_examples(lines)}

  def _generate_examples(self, lines):
    for i, line in enumerate(lines):
      yield i, {"text": line}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, docs):
  root = tmp_path_factory.mktemp("tfds")
  DynamoDataTestDocs.SOURCE_FILE = str(root / "docs.txt")
  with open(DynamoDataTestDocs.SOURCE_FILE, "w") as f:
    f.write("\n".join(docs))
  DynamoDataTestDocs(data_dir=str(root / "data"),
                     file_format="array_record").download_and_prepare()
  return str(root / "data")


def tfds_config(data_dir, **kw):
  return DataConfig(source="tfds", name="dynamo_data_test_docs",
                    data_dir=data_dir, **kw)


# ---- packing -----------------------------------------------------------------

def test_shapes_and_dtypes(configs):
  it = make_batches(configs["text"], CharTokenizer(), batch_size=3, seq_len=17,
                    seed=0)
  batch = next(it)
  assert set(batch) == {"tokens", "segment_ids"}
  for value in batch.values():
    assert value.shape == (3, 17) and value.dtype == np.int32


def test_segment_ids_on_hand_made_documents(tmp_path):
  cfg = DataConfig(source="jsonl", field="body", shuffle=False, num_epochs=1,
                   paths=(write_jsonl(tmp_path / "d.jsonl",
                                      ["ab", "cdefg", "", "h"]),))
  batches = collect(make_batches(cfg, CharTokenizer(), batch_size=2,
                                 seq_len=4, seed=0))
  a, b, c, d, e, f, g, h = (ord(x) for x in "abcdefgh")
  # Stream: ab E cdefg E h E (the empty document is skipped); "cdefg E"
  # continues in the next row under segment 1, padding is segment 0.
  np.testing.assert_array_equal(np.concatenate([x["tokens"] for x in batches]),
                                [[a, b, EOS, c], [d, e, f, g],
                                 [EOS, h, EOS, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(
      np.concatenate([x["segment_ids"] for x in batches]),
      [[1, 1, 1, 2], [1, 1, 1, 1], [1, 2, 2, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("kind", ["text", "lines", "jsonl", "npy", "bin"])
def test_packing_keeps_every_token_once(configs, docs, kind):
  cfg = DataConfig.from_dict({**configs[kind].to_dict(), "num_epochs": 1})
  batches = collect(make_batches(cfg, CharTokenizer(), batch_size=2,
                                 seq_len=13, seed=3))
  got = split_docs(stream(batches))
  assert sorted(got) == sorted(docs)
  assert got != docs  # Shuffled.
  for b in batches:  # A new segment starts exactly after each EOS.
    tokens, seg = b["tokens"], b["segment_ids"]
    real = seg > 0
    assert np.all(seg[:, 0][real[:, 0]] == 1)
    expected = seg[:, :-1] + (tokens[:, :-1] == EOS)
    np.testing.assert_array_equal(seg[:, 1:][real[:, 1:]],
                                  expected[real[:, 1:]])


def test_no_shuffle_keeps_file_order(configs, docs):
  cfg = DataConfig.from_dict({**configs["jsonl"].to_dict(), "num_epochs": 1,
                              "shuffle": False})
  batches = collect(make_batches(cfg, CharTokenizer(), batch_size=4,
                                 seq_len=32, seed=0))
  assert split_docs(stream(batches)) == docs


def test_epochs_repeat_with_a_new_order(configs, docs):
  cfg = DataConfig.from_dict({**configs["npy"].to_dict(), "num_epochs": 2})
  got = split_docs(stream(collect(make_batches(
      cfg, CharTokenizer(), batch_size=2, seq_len=32, seed=0))))
  first, second = got[:len(docs)], got[len(docs):]
  assert sorted(first) == sorted(second) == sorted(docs)
  assert first != second


# ---- order -------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_differs(configs):
  def first(seed):
    return collect(make_batches(configs["lines"], CharTokenizer(),
                                batch_size=2, seq_len=16, seed=seed), limit=5)
  assert_equal_batches(first(7), first(7))
  assert not np.array_equal(first(7)[0]["tokens"], first(8)[0]["tokens"])


@pytest.mark.parametrize("kind", ["text", "lines", "jsonl", "npy", "bin"])
def test_resume_equals_uninterrupted(configs, kind):
  check_resume(configs[kind], CharTokenizer())


def check_resume(cfg, tokenizer, num_batches=12, **kw):
  """Resuming from the state after k batches (through JSON) gives exactly
  batches k, k+1, ... of an uninterrupted run; also across epoch ends."""
  kw = dict(batch_size=2, seq_len=29, seed=5, **kw)
  full = collect(make_batches(cfg, tokenizer, **kw), limit=num_batches)
  assert len(full) == num_batches
  it = make_batches(cfg, tokenizer, **kw)
  states = [json.loads(json.dumps(it.get_state()))]
  for _ in range(num_batches):
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
  it.close()
  assert max(len(json.dumps(s)) for s in states) < 300  # A cursor, no data.
  for k in (0, 1, num_batches // 2, num_batches - 1):
    resumed = make_batches(cfg, tokenizer, **kw)
    resumed.set_state(states[k])
    assert_equal_batches(collect(resumed, limit=num_batches - k), full[k:])


def test_resume_with_prefetch_thread(configs):
  cfg = DataConfig.from_dict({**configs["jsonl"].to_dict(), "prefetch": 3})
  check_resume(cfg, CharTokenizer())
  it = make_batches(cfg, CharTokenizer(), batch_size=2, seq_len=29, seed=5)
  full = collect(make_batches(cfg, CharTokenizer(), batch_size=2, seq_len=29,
                              seed=5), limit=6)
  got = [next(it), next(it)]
  it.close()  # The thread ran ahead; closing rewinds to what was returned.
  got += collect(it, limit=4)
  assert_equal_batches(got, full)


def test_errors_in_the_prefetch_thread_reach_the_caller(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n{"text": \n')
  cfg = DataConfig(source="jsonl", paths=(str(path),), shuffle=False)
  it = make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=4, seed=0)
  with pytest.raises(DataError, match="record 1.*not valid JSON"):
    next(it)


def test_resume_of_a_finished_run_stays_finished(configs):
  cfg = DataConfig.from_dict({**configs["npy"].to_dict(), "num_epochs": 1})
  it = make_batches(cfg, CharTokenizer(), batch_size=4, seq_len=64, seed=0)
  collect(it)
  resumed = make_batches(cfg, CharTokenizer(), batch_size=4, seq_len=64,
                         seed=0)
  resumed.set_state(it.get_state())
  assert collect(resumed) == []


def test_state_from_another_seed_is_refused(configs):
  kw = dict(batch_size=2, seq_len=16)
  state = make_batches(configs["text"], CharTokenizer(), seed=1,
                       **kw).get_state()
  with pytest.raises(DataError, match="seed"):
    make_batches(configs["text"], CharTokenizer(), seed=2,
                 **kw).set_state(state)


@pytest.mark.parametrize("shuffle", [True, False])
def test_host_shards_are_disjoint_and_cover(configs, docs, shuffle):
  cfg = DataConfig.from_dict({**configs["bin"].to_dict(), "num_epochs": 1,
                              "shuffle": shuffle})
  shards = [split_docs(stream(collect(make_batches(
      cfg, CharTokenizer(), batch_size=2, seq_len=16, seed=4,
      process_index=p, process_count=3)))) for p in range(3)]
  assert sorted(sum(shards, [])) == sorted(docs)  # Disjoint and complete.
  assert all(abs(len(s) - len(docs) / 3) < 1 for s in shards)


def test_more_hosts_than_documents(tmp_path):
  cfg = DataConfig(source="text", paths=(write_text_files(tmp_path, ["x"]),))
  with pytest.raises(DataError, match="none for process 1"):
    make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=4, seed=0,
                 process_index=1, process_count=2)


# ---- tfds --------------------------------------------------------------------

def test_tfds_mock_data():
  cfg = DataConfig(source="tfds", name="tiny_shakespeare", field="text")
  with tfds.testing.mock_data(num_examples=25):
    batch = next(make_batches(cfg, CharTokenizer(), batch_size=2, seq_len=16,
                              seed=0))
    assert batch["tokens"].shape == (2, 16)
    assert np.all(batch["segment_ids"] > 0)
    check_resume(cfg, CharTokenizer())


def test_tfds_missing_field_names_the_fields():
  cfg = DataConfig(source="tfds", name="tiny_shakespeare", field="content")
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(DataError, match=r"no field 'content'.*'text'"):
      make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=8, seed=0)


def test_tfds_local_dataset(tfds_dir, docs):
  cfg = tfds_config(tfds_dir, num_epochs=1)
  got = split_docs(stream(collect(make_batches(
      cfg, CharTokenizer(), batch_size=2, seq_len=19, seed=0))))
  assert sorted(got) == sorted(docs)
  check_resume(tfds_config(tfds_dir), CharTokenizer())


def test_tfds_split_slicing_and_sharding(tfds_dir, docs):
  cfg = tfds_config(tfds_dir, split="train[:50%]", num_epochs=1)
  shards = [split_docs(stream(collect(make_batches(
      cfg, CharTokenizer(), batch_size=2, seq_len=19, seed=0,
      process_index=p, process_count=2)))) for p in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert len(shards[0]) + len(shards[1]) == len(docs) // 2


# ---- tokenizers --------------------------------------------------------------

def byte_level_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(make_docs(50), trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def test_tokenizers_and_transformers_tokenizers(configs, docs):
  import transformers
  rust = byte_level_tokenizer()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=rust,
                                            eos_token="<|endoftext|>")
  eos = rust.token_to_id("<|endoftext|>")
  cfg = DataConfig.from_dict({**configs["jsonl"].to_dict(), "num_epochs": 1,
                              "shuffle": False})
  expected = [t for d in docs for t in rust.encode(d).ids + [eos]]
  for tokenizer in (rust, hf):  # EOS found by token name / eos_token_id.
    got = stream(collect(make_batches(cfg, tokenizer, batch_size=2,
                                      seq_len=23, seed=0)))
    assert got == expected


def test_explicit_eos_id_and_no_tokenizer_for_tokens(configs, docs):
  cfg = DataConfig.from_dict({**configs["npy"].to_dict(), "eos_id": EOS,
                              "num_epochs": 1})
  got = split_docs(stream(collect(make_batches(cfg, None, batch_size=2,
                                               seq_len=16, seed=0))))
  assert sorted(got) == sorted(docs)


# ---- errors ------------------------------------------------------------------

def test_unknown_config_key():
  with pytest.raises(ConfigError,
                     match=r"unknown DataConfig keys \['fields'\]"):
    DataConfig.from_dict({"source": "jsonl", "paths": ["x"], "fields": "a"})


def test_bad_config_values():
  with pytest.raises(ConfigError, match="source"):
    DataConfig(source="csv", paths=("x",))
  with pytest.raises(ConfigError, match="name"):
    DataConfig(source="tfds")
  with pytest.raises(ConfigError, match="paths"):
    DataConfig(source="text")


def test_missing_file(tmp_path):
  cfg = DataConfig(source="text", paths=(str(tmp_path / "nope.txt"),))
  with pytest.raises(DataError, match="nope.txt.*does not exist"):
    make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=8, seed=0)
  cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "*.jsonl"),))
  with pytest.raises(DataError, match="no file matches"):
    make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=8, seed=0)


def test_jsonl_missing_field_names_the_fields(configs):
  cfg = DataConfig.from_dict({**configs["jsonl"].to_dict(), "field": "text"})
  with pytest.raises(DataError, match=r"no field 'text'.*\['body', 'id'\]"):
    make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=8, seed=0)


def test_bin_of_the_wrong_dtype(tmp_path):
  path = str(tmp_path / "odd.bin")
  np.arange(3, dtype=np.uint16).tofile(path)  # 6 bytes: not uint32s.
  cfg = DataConfig(source="tokens", token_dtype="uint32", paths=(path,))
  with pytest.raises(DataError, match="token_dtype"):
    make_batches(cfg, CharTokenizer(), batch_size=1, seq_len=8, seed=0)


def test_tokenizer_without_eos(configs):
  class NoEos:
    def encode(self, text):
      return [1]
  with pytest.raises(DataError, match="eos_id"):
    make_batches(configs["text"], NoEos(), batch_size=1, seq_len=8, seed=0)


def test_named_corpus_paths(tmp_path, monkeypatch):
  """`corpus:NAME` resolves to the cached corpus; an unknown name is an error
  naming the known ones. The cache is pre-filled here, so no fetch runs."""
  from dynamo_jax.data import corpus
  from dynamo_jax.data.files import expand_paths
  monkeypatch.setenv("DYNAMO_CACHE", str(tmp_path))
  cached = tmp_path / "corpus" / "shakespeare"
  cached.mkdir(parents=True)
  (cached / "b.txt").write_text("to be")
  (cached / "a.txt").write_text("or not")
  assert expand_paths(["corpus:shakespeare"], "text") == [
      str(cached / "a.txt"), str(cached / "b.txt")]
  with pytest.raises(DataError, match="unknown corpus corpus:nope; known: "
                     "corpus:shakespeare"):
    expand_paths(["corpus:nope"], "text")
  assert corpus.resolve_path("x/y.txt") == "x/y.txt"
