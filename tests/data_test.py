"""Tests of the data plumbing: SentencePiece tokenizer, JSONL sources, TFDS array_record,
and the bundled arithmetic task.

Everything runs offline on small synthetic corpora in temporary folders. Round trips are
checked for exact equality: text -> ids -> text, and JSONL -> array_record -> records.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax import fileio
from rlhf_jax.data import batching
from rlhf_jax.data import sources
from rlhf_jax.data import tasks
from rlhf_jax.data import tfds_builder
from rlhf_jax.data import tokenizer as tokenizer_lib

# Text the corpus never contains: CJK, emoji, tabs, runs of spaces, newlines, edge spaces,
# and SentencePiece's own whitespace mark "▁" (U+2581), which must not turn into a space.
HARD_TEXTS = [
    "",
    "the cat sat",
    "  two leading, three trailing   ",
    "a    run of    spaces",
    "line one\nline two\n\nline four\n",
    "tab\there\r\nwindows",
    "héllo wörld, ça va? Æsir ñandú",
    "日本語のテキスト 😀🎉 mixed with words",
    "literal \u2581 mark and \u2581\u2581 twice",
    "\x00 nul and \x7f del",
]


def setUpModule():
  tfds.disable_progress_bar()


def make_tempdir(test: absltest.TestCase) -> str:
  # tempfile rather than create_tempdir: the latter needs absl flags, which pytest never parses.
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return tmp.name


def make_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
  """Lower-case words over a small alphabet: no CJK, no emoji, no tabs, no newlines."""
  rng = random.Random(seed)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))
           for _ in range(500)] + ["the", "cat", "sat", "line", "one", "two"]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


class SentencePieceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = make_tempdir(self)

  def train(self, model_type: str = "bpe", vocab_size: int = 400, name: str = "spm",
            **kwargs) -> str:
    return tokenizer_lib.train_sentencepiece(
        make_corpus(), os.path.join(self.dir, name), vocab_size, model_type=model_type,
        **kwargs)

  @parameterized.parameters("bpe", "unigram")
  def test_round_trip_is_exact(self, model_type):
    tok = tokenizer_lib.SentencePieceTokenizer(self.train(model_type))
    self.assertEqual(tok.vocab_size, 400)
    for text in HARD_TEXTS:
      ids = tok.encode(text)
      self.assertEqual(tok.decode(ids), text)
      self.assertNotIn(3, ids, f"unk id in the encoding of {text!r}; byte fallback is off?")
    # Unseen characters are spelled in bytes; corpus text is merged into longer pieces.
    self.assertLen(tok.encode("日"), 3)
    lines = make_corpus()[:100]
    self.assertLess(sum(len(tok.encode(t)) for t in lines), 0.8 * sum(map(len, lines)))

  def test_special_ids_and_decode_stops_at_eos(self):
    tok = tokenizer_lib.SentencePieceTokenizer(self.train())
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))
    self.assertNotEqual(tok.pad_id, tok.eos_id)
    ids = ([tok.pad_id, tok.pad_id, tok.bos_id] + tok.encode("the cat") + [tok.eos_id]
           + tok.encode(" sat") + [tok.pad_id])
    self.assertEqual(tok.decode(ids), "the cat")
    with self.assertRaisesRegex(ValueError, "outside the SentencePiece vocabulary"):
      tok.decode([tok.vocab_size + 5])

  @parameterized.parameters("bpe", "unigram")
  def test_same_corpus_gives_same_file(self, model_type):
    # A small input_sentence_size makes sampling part of what must be deterministic.
    a = self.train(model_type, name="a", input_sentence_size=500)
    b = self.train(model_type, name="b", input_sentence_size=500)
    with open(a, "rb") as fa, open(b, "rb") as fb:
      self.assertEqual(fa.read(), fb.read())
    self.assertEqual(sorted(os.listdir(self.dir)), ["a.model", "b.model"])  # No temp files.

  def test_model_without_pad_uses_unk(self):
    tok = tokenizer_lib.SentencePieceTokenizer(self.train(pad_id=-1, unk_id=0))
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))
    self.assertEqual(tok.decode([0] + tok.encode("the cat") + [0, 2, 5]), "the cat")

  def test_bad_model_file(self):
    path = os.path.join(self.dir, "broken.model")
    with open(path, "wb") as f:
      f.write(b"not a model")
    with self.assertRaisesRegex(ValueError, "broken.model' is not a readable SentencePiece"):
      tokenizer_lib.SentencePieceTokenizer(path)

  def test_vocab_too_large_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, "vocab_size this corpus supports"):
      self.train(vocab_size=100_000)
    self.assertEqual(os.listdir(self.dir), [])

  def test_long_texts_are_cut_not_skipped(self):
    # The trainer drops sentences over max_sentence_length bytes without a word.
    text = "ab cd é日\n" * 300 + "x" * 5000
    pieces = list(tokenizer_lib._sentences([text], max_bytes=200))
    self.assertEqual("".join(pieces), text)
    self.assertLessEqual(max(len(p.encode()) for p in pieces), 200)

  def test_empty_corpus(self):
    with self.assertRaisesRegex(ValueError, "corpus .* is empty"):
      tokenizer_lib.train_sentencepiece(["", ""], os.path.join(self.dir, "spm"), 400)


class GetTokenizerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = make_tempdir(self)
    self.corpus_calls = 0

  def corpus(self):
    self.corpus_calls += 1
    return iter(make_corpus())

  def test_byte(self):
    tok = tokenizer_lib.get_tokenizer("byte", None, None, 0)
    self.assertIsInstance(tok, tokenizer_lib.ByteTokenizer)

  def test_trains_once_then_reuses_cache(self):
    tok = tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, self.corpus, 400)
    path = os.path.join(self.workdir, "tokenizer", "spm.model")
    self.assertEqual(self.corpus_calls, 1)
    self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["spm.model"])
    # Back-date the file so that a rewrite would show up even on a coarse clock.
    os.utime(path, (1_000_000, 1_000_000))
    again = tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, self.corpus, 400)
    self.assertEqual(self.corpus_calls, 1)
    self.assertEqual(os.stat(path).st_mtime, 1_000_000)
    self.assertEqual(again.encode("the cat sat"), tok.encode("the cat sat"))
    # The cache is found without a corpus at all.
    tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, None, 400)
    with self.assertRaisesRegex(ValueError, "has vocab_size 400, but 500 was asked for"):
      tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, self.corpus, 500)

  def test_model_path_wins(self):
    path = tokenizer_lib.train_sentencepiece(make_corpus(), os.path.join(self.workdir, "m"), 300)
    tok = tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, self.corpus, 400, path)
    self.assertEqual(tok.vocab_size, 300)
    self.assertEqual(self.corpus_calls, 0)
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "tokenizer")))

  def test_errors(self):
    with self.assertRaisesRegex(FileNotFoundError, "nope.model' does not exist"):
      tokenizer_lib.get_tokenizer("sentencepiece", None, None, 400, "/tmp/nope.model")
    with self.assertRaisesRegex(ValueError, "needs a model_path, or a workdir"):
      tokenizer_lib.get_tokenizer("sentencepiece", None, self.corpus, 400)
    with self.assertRaisesRegex(ValueError, "no corpus to train one on"):
      tokenizer_lib.get_tokenizer("sentencepiece", self.workdir, None, 400)
    with self.assertRaisesRegex(ValueError, "kind is 'wordpiece'"):
      tokenizer_lib.get_tokenizer("wordpiece", self.workdir, self.corpus, 400)


def sample_records(schema: str, n: int = 40) -> list[dict[str, str]]:
  """Records whose fields hold the hard texts (minus the empty one) in turn."""
  texts = [t for t in HARD_TEXTS if t] + [f"record {i}" for i in range(n)]
  fields = sources.SCHEMAS[schema]
  return [{f: texts[(i + k) % len(texts)] + f" #{i}" for k, f in enumerate(fields)}
          for i in range(n)]


def write_lines(path: str, lines: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


class JsonlTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = make_tempdir(self)

  @parameterized.parameters(*sources.SCHEMAS)
  def test_round_trip(self, schema):
    records = sample_records(schema)
    path = os.path.join(self.dir, "data.jsonl")
    self.assertEqual(sources.write_jsonl(path, records, schema), len(records))
    self.assertEqual(sources.read_jsonl(path, schema), records)
    self.assertEqual(os.listdir(self.dir), ["data.jsonl"])

  def test_blank_lines_skipped_extra_fields_dropped(self):
    path = write_lines(os.path.join(self.dir, "file.jsonl"), [
        "", json.dumps({"prompt": "a", "id": 7}), "   ", json.dumps({"prompt": "b"}), ""])
    self.assertEqual(sources.read_jsonl(path, "prompt"), [{"prompt": "a"}, {"prompt": "b"}])

  def test_malformed_line_names_file_and_line(self):
    path = write_lines(os.path.join(self.dir, "file.jsonl"), [
        json.dumps({"prompt": "a"}), "", '{"prompt": "b"', json.dumps({"prompt": "c"})])
    with self.assertRaisesRegex(ValueError, r"file\.jsonl:3: malformed JSON"):
      sources.read_jsonl(path, "prompt")

  @parameterized.named_parameters(
      ("missing", {"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
      ("empty", {"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is an empty string"),
      ("not_string", {"prompt": 3, "chosen": "c", "rejected": "r"}, "'prompt' must be a string"),
      ("not_object", ["p", "c", "r"], "expected a JSON object"),
  )
  def test_bad_record_names_file_line_and_field(self, bad, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_lines(os.path.join(self.dir, "file.jsonl"),
                       [json.dumps(good), json.dumps(good), json.dumps(bad)])
    with self.assertRaisesRegex(ValueError, rf"file\.jsonl:3: .*{message}"):
      sources.read_jsonl(path, "preference")

  def test_other_errors(self):
    with self.assertRaisesRegex(ValueError, "schema is 'dpo'"):
      sources.read_jsonl("x.jsonl", "dpo")
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      sources.read_jsonl(os.path.join(self.dir, "missing.jsonl"), "sft")
    with self.assertRaisesRegex(ValueError, "no records"):
      sources.read_jsonl(write_lines(os.path.join(self.dir, "blank.jsonl"), ["", " "]), "sft")
    path = os.path.join(self.dir, "out.jsonl")
    with self.assertRaisesRegex(ValueError, r"out\.jsonl: record 2: missing field"):
      sources.write_jsonl(path, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "sft")
    self.assertEqual(os.listdir(self.dir), ["blank.jsonl"])  # Nothing half-written.


class TfdsBuilderTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = make_tempdir(self)
    self.data_dir = os.path.join(self.dir, "tfds")

  def jsonl(self, schema: str, records=None, name: str = "data.jsonl") -> str:
    path = os.path.join(self.dir, name)
    sources.write_jsonl(path, records or sample_records(schema), schema)
    return path

  @parameterized.parameters(*sources.SCHEMAS)
  def test_round_trip(self, schema):
    records = sample_records(schema)
    path = self.jsonl(schema, records, name=f"my-{schema}.jsonl")
    folder = tfds_builder.prepare_jsonl_dataset(path, schema, self.data_dir)
    self.assertEqual(folder, os.path.join(self.data_dir, f"my_{schema}", "1.0.0"))
    by_dir = tfds_builder.load_split(folder, "train")
    self.assertLen(by_dir, len(records))
    self.assertEqual(list(by_dir), records)  # Same records, same order, str not bytes.
    self.assertEqual(by_dir[-1], records[-1])
    self.assertEqual(by_dir[2:5], records[2:5])
    by_name = tfds_builder.load_split(f"my_{schema}", "train", self.data_dir)
    self.assertEqual(list(by_name), records)
    self.assertNotIn("tensorflow", sys.modules)  # Written and read without TensorFlow.

  def test_plain_tfds_reads_it_by_name(self):
    records = sample_records("sft")
    tfds_builder.prepare_jsonl_dataset(self.jsonl("sft", records), "sft", self.data_dir,
                                       name="elsewhere")
    source = tfds.data_source("elsewhere", split="train", data_dir=self.data_dir,
                              download=False)
    self.assertLen(source, len(records))
    self.assertEqual({k: v.decode() for k, v in source[7].items()}, records[7])

  def test_several_splits_and_slices(self):
    train, test = sample_records("prompt", 30), sample_records("prompt", 5)
    tfds_builder.prepare_jsonl_dataset(
        {"train": self.jsonl("prompt", train, "train.jsonl"),
         "test": self.jsonl("prompt", test, "test.jsonl")}, "prompt", self.data_dir, name="two")
    self.assertEqual(list(tfds_builder.load_split("two", "test", self.data_dir)), test)
    self.assertEqual(list(tfds_builder.load_split("two:1.0.0", "train[:10]", self.data_dir)),
                     train[:10])

  def test_reuse_changed_source_and_overwrite(self):
    path = self.jsonl("prompt", [{"prompt": "old"}])
    folder = tfds_builder.prepare_jsonl_dataset(path, "prompt", self.data_dir, name="d")
    shard = os.path.join(folder, "d-train.array_record-00000-of-00001")
    os.utime(shard, (1_000_000, 1_000_000))
    tfds_builder.prepare_jsonl_dataset(path, "prompt", self.data_dir, name="d")
    self.assertEqual(os.stat(shard).st_mtime, 1_000_000)  # Same file: not rebuilt.
    self.jsonl("prompt", [{"prompt": "new"}, {"prompt": "newer"}])
    with self.assertRaisesRegex(ValueError, "built from other data.*overwrite=True"):
      tfds_builder.prepare_jsonl_dataset(path, "prompt", self.data_dir, name="d")
    tfds_builder.prepare_jsonl_dataset(path, "prompt", self.data_dir, name="d", overwrite=True)
    self.assertEqual(list(tfds_builder.load_split("d", "train", self.data_dir)),
                     [{"prompt": "new"}, {"prompt": "newer"}])
    # The new contents are now the recorded ones: preparing again reuses them.
    os.utime(shard, (1_000_000, 1_000_000))
    tfds_builder.prepare_jsonl_dataset(path, "prompt", self.data_dir, name="d")
    self.assertEqual(os.stat(shard).st_mtime, 1_000_000)

  def test_errors(self):
    bad = write_lines(os.path.join(self.dir, "bad.jsonl"),
                      [json.dumps({"prompt": "p", "completion": "c"}), json.dumps({"prompt": "p"})])
    with self.assertRaisesRegex(ValueError, r"bad\.jsonl:2: missing field 'completion'"):
      tfds_builder.prepare_jsonl_dataset(bad, "sft", self.data_dir)
    self.assertFalse(os.path.exists(os.path.join(self.data_dir, "bad", "1.0.0")))
    with self.assertRaisesRegex(ValueError, "not a TFDS name"):
      tfds_builder.prepare_jsonl_dataset(bad, "sft", self.data_dir, name="Bad-Name")
    with self.assertRaisesRegex(FileNotFoundError, "no dataset 'nope' under data_dir"):
      tfds_builder.load_split("nope", "train", self.data_dir)
    tfds_builder.prepare_jsonl_dataset(self.jsonl("sft"), "sft", self.data_dir, name="ok")
    with self.assertRaisesRegex(ValueError, "Unknown split 'test'"):
      tfds_builder.load_split("ok", "test", self.data_dir)


class MessagesNameTheThingTest(absltest.TestCase):
  """Errors name the file (or source), 1-based record numbers, counts and the fix: one line."""

  def setUp(self):
    super().setUp()
    self.dir = make_tempdir(self)

  def assertOneLine(self, err):
    self.assertNotIn("\n", str(err.exception))

  def test_record_numbers_are_one_based(self):
    tok = tokenizer_lib.ByteTokenizer()
    recs = [{"prompt": "p", "completion": "ok"}, {"prompt": "p", "completion": "x" * 20}]
    with self.assertRaisesRegex(ValueError, r"^src\.jsonl: record 2: completion is 21 tokens, "
                                r"over the limit 8 \(data\.max_completion_len\)") as err:
      batching.sft_arrays(recs, tok, 4, 8, truncation="error", source="src.jsonl")
    self.assertOneLine(err)
    with self.assertRaisesRegex(ValueError, r"^src: record 1: field 'completion'"):
      batching.sft_arrays([{"prompt": "p"}], tok, 4, 8, source="src")
    with self.assertRaisesRegex(ValueError, r"^src: record 1: empty prompt"):
      batching.sft_arrays([{"prompt": "", "completion": "c"}], tok, 4, 8, source="src")
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "a"}]
    with self.assertRaisesRegex(ValueError, r"^prefs: record 1: chosen and rejected are "
                                "identical"):
      batching.preference_arrays(pairs, tok, 4, 8, None, "error", "prefs")
    with self.assertRaisesRegex(ValueError, r"^prefs: record 2: missing field 'rejected'"):
      batching.preference_arrays([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                  {"prompt": "p", "chosen": "a"}], tok, 4, 8, source="prefs")

  def test_directory_as_data_path(self):
    with self.assertRaisesRegex(ValueError, rf"^{self.dir} is a directory; give a JSONL "
                                "file") as err:
      sources.read_jsonl(self.dir, "sft")
    self.assertOneLine(err)
    with self.assertRaisesRegex(ValueError, rf"split 'train': {self.dir} is a directory; give "
                                "a JSONL file"):
      tfds_builder.prepare_jsonl_dataset(self.dir, "sft", os.path.join(self.dir, "tfds"),
                                         name="d")

  def test_too_few_records_for_one_batch(self):
    arrays = {"tokens": np.zeros((3, 5), np.int32)}
    with self.assertRaisesRegex(
        ValueError, r"^train\.jsonl: 3 records, fewer than one batch of 4 "
        r"\(sft\.data\.batch_size\); give more records or a smaller batch\.$") as err:
      batching.EpochIterator(arrays, 4, 0, source="train.jsonl",
                             batch_key="sft.data.batch_size")
    self.assertOneLine(err)
    with self.assertRaisesRegex(ValueError, r"^dataset: 3 records, fewer than one batch of 4 "
                                r"\(batch_size\)"):
      batching.EpochIterator(arrays, 4, 0)
    self.assertEqual(len(next(batching.EpochIterator(arrays, 3, 0))["tokens"]), 3)

  def test_full_disk_names_the_file(self):
    path = os.path.join(self.dir, "out.jsonl")
    for code in (errno.ENOSPC, errno.EFBIG):
      with mock.patch.object(fileio.os, "fsync", side_effect=OSError(code, os.strerror(code))):
        with self.assertRaisesRegex(OSError, "no space left on device / file too large: "
                                    f"{path}") as err:
          sources.write_jsonl(path, [{"prompt": "p", "completion": "c"}], "sft")
        self.assertEqual(err.exception.errno, code)
        self.assertOneLine(err)
        with self.assertRaisesRegex(OSError, "no space left on device / file too large: "
                                    ".*settings\\.json"):
          fileio.write_json(os.path.join(self.dir, "settings.json"), {"a": 1})
    self.assertEqual(os.listdir(self.dir), [])  # no temporary file left behind
    # Other OS errors pass through unchanged.
    with mock.patch.object(fileio.os, "fsync", side_effect=PermissionError(errno.EACCES, "no")):
      with self.assertRaises(PermissionError):
        fileio.write_json(os.path.join(self.dir, "x.json"), {})


class ArithmeticTaskTest(parameterized.TestCase):

  def test_registered(self):
    task = tasks.get_task("arithmetic")
    self.assertIsInstance(task, tasks.ArithmeticTask)
    self.assertEqual(task.name, "arithmetic")
    self.assertIn("arithmetic", tasks.TASKS)

  def test_format_and_determinism(self):
    task = tasks.ArithmeticTask()
    records = task.sft_records(200, seed=3)
    self.assertEqual(records, task.sft_records(200, seed=3))
    self.assertEqual([{"prompt": r["prompt"]} for r in records], task.prompts(200, seed=3))
    self.assertNotEqual(records, task.sft_records(200, seed=4))
    self.assertNotEqual(task.prompts(50, 3, "train"), task.prompts(50, 3, "eval"))
    for r in records:
      a, b = r["prompt"][:-1].split("+")
      self.assertRegex(r["prompt"], r"^[1-9]\d\+[1-9]\d=$")  # two-digit operands
      self.assertEqual(r["completion"], f" {int(a) + int(b)}")  # leading space, as sort
    self.assertEqual(list(task.corpus())[:3],
                     [r["prompt"] + r["completion"] for r in task.sft_records(3, 0)])

  @parameterized.parameters("+", "+-")
  def test_splits_are_disjoint(self, ops):
    task = tasks.ArithmeticTask(ops=ops)
    train = {p["prompt"] for seed in range(3) for p in task.prompts(3000, seed, "train")}
    held = {p["prompt"] for seed in range(3) for p in task.prompts(1000, seed, "eval")}
    self.assertEmpty(train & held)
    # Commuted sums share a split: "45+37=" is never trained on when "37+45=" is held out.
    commuted = {"+".join(reversed(p[:-1].split("+"))) + "=" for p in held if "+" in p}
    self.assertEmpty(train & commuted)
    self.assertGreater(len(held), 400)  # about a tenth of the 8100 sums (or 8100 + 4095)
    if ops == "+-":
      self.assertTrue(any("-" in p for p in held))
      for p in train:
        if "-" in p:
          a, b = map(int, p[:-1].split("-"))
          self.assertGreaterEqual(a, b)  # answers are never negative

  def test_exact_match_reward(self):
    task = tasks.ArithmeticTask(min_digits=1, max_digits=3, ops="+-")
    for r in task.sft_records(300, seed=0) + task.sft_records(100, seed=0, split="eval"):
      self.assertEqual(task.gold_reward(r["prompt"], r["completion"]), 1.0)
    self.assertEqual(task.gold_reward("37+45=", "82"), 1.0)
    self.assertEqual(task.gold_reward("37+45=", " 82\n"), 1.0)
    self.assertEqual(task.gold_reward("91-19=", " 72"), 1.0)
    for wrong in (" 83", " 8", " 820", " 082", " 82 x", " 82+1", "", " eighty-two"):
      self.assertEqual(task.gold_reward("37+45=", wrong), 0.0, wrong)

  def test_partial_credit(self):
    task = tasks.ArithmeticTask(partial_credit=True)
    for completion, want in [(" 82", 1.0), (" 85", 0.5), (" 72", 0.5), (" 28", 0.0),
                             (" 2", 0.5),  # units right, tens missing
                             (" 182", 2 / 3), (" 082", 2 / 3),  # an extra digit
                             (" 82 x", 0.5), ("= 85", 0.25),  # other text: halved
                             (" 8", 0.0), ("", 0.0), (" x", 0.0)]:
      self.assertAlmostEqual(task.gold_reward("37+45=", completion), want, msg=completion)
    self.assertEqual(task.gold_reward("99+99=", " 198"), 1.0)
    self.assertAlmostEqual(task.gold_reward("99+99=", " 98"), 2 / 3)

  @parameterized.named_parameters(
      ("zero_digits", dict(min_digits=0), "1 <= min_digits <= max_digits <= 9"),
      ("min_over_max", dict(min_digits=3, max_digits=2), "got 3, 2"),
      ("too_many_digits", dict(max_digits=10), "max_digits <= 9"),
      ("float_digits", dict(max_digits=2.5), "integers"),
      ("bad_op", dict(ops="*"), "ops is '\\*'"),
      ("no_op", dict(ops=""), "ops is ''"),
      ("twice", dict(ops="++"), "each once"),
      ("partial_not_bool", dict(partial_credit="yes"), "partial_credit is 'yes'"),
  )
  def test_bad_constructor_args(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, f"^arithmetic task: .*{message}"):
      tasks.ArithmeticTask(**kwargs)

  def test_other_errors(self):
    task = tasks.ArithmeticTask()
    with self.assertRaisesRegex(ValueError, "split is 'test'; choose 'train' or 'eval'"):
      task.prompts(1, 0, "test")
    with self.assertRaisesRegex(ValueError, "'sort 1 2 =' is not a prompt like '37\\+45='"):
      task.gold_reward("sort 1 2 =", " 3")
    with self.assertRaisesRegex(ValueError, "bundled tasks are .*'arithmetic'"):
      tasks.get_task("arith")

  def test_one_digit_space_and_tokenizers(self):
    task = tasks.ArithmeticTask(min_digits=1, max_digits=1)
    prompts = {p["prompt"] for p in task.prompts(500, 0)}
    self.assertIn("0+0=", prompts | {p["prompt"] for p in task.prompts(200, 0, "eval")})
    # The completion is its own tokens after the prompt: byte and SentencePiece alike.
    byte = tokenizer_lib.ByteTokenizer()
    self.assertEqual(byte.decode(byte.encode(" 82")), " 82")
    spm_path = tokenizer_lib.train_sentencepiece(
        tasks.ArithmeticTask().corpus(), os.path.join(make_tempdir(self), "spm"), 300)
    tok = tokenizer_lib.SentencePieceTokenizer(spm_path)
    for r in tasks.ArithmeticTask().sft_records(20, 0):
      self.assertEqual(tok.decode(tok.encode(r["prompt"])), r["prompt"])
      self.assertEqual(tok.decode(tok.encode(r["completion"])), r["completion"])


if __name__ == "__main__":
  absltest.main()
