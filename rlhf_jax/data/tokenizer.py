"""The tokenizer interface every stage uses: byte-level, SentencePiece and (hf_tokenizer.py)
Hugging Face `tokenizers` implementations.

Stages only touch `encode`, `encode_prompt`, `decode`, `vocab_size` and the special ids, so
backends drop in without changing them. `encode_prompt` is how a prompt enters the model:
the text itself here, a chat-template user turn for imported chat models. Pad and EOS are
different ids on purpose: a padded position must never be mistaken for an end of text.
"""

from __future__ import annotations

import io
import os
import random
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm

from rlhf_jax.data import hf_tokenizer
# content_ids is re-exported: it lives in token_ids.py, which hf_tokenizer.py shares.
from rlhf_jax.data.token_ids import content_ids  # pylint: disable=unused-import
from rlhf_jax.fileio import atomic_write


class Tokenizer(Protocol):
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...

  def encode_prompt(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids (pad 0, bos 1, eos 2), as in ByT5.

  Exact round trip for any text; no training, no files. `decode` drops special ids and
  stops at the first EOS.
  """

  pad_id, bos_id, eos_id = 0, 1, 2
  _OFFSET = 3
  vocab_size = 256 + _OFFSET

  def encode(self, text: str) -> list[int]:
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def encode_prompt(self, text: str) -> list[int]:
    return self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i >= self._OFFSET:
        out.append(i - self._OFFSET)
    return out.decode("utf-8", errors="replace")


# SentencePiece writes a space as U+2581 "▁" and turns every "▁" back into a space when it
# decodes, so a literal "▁" in the text would come back as " ". We encode it as its UTF-8
# bytes instead: byte pieces decode verbatim.
_SPACE_MARK = "\u2581"


class SentencePieceTokenizer:
  """A trained SentencePiece `.model` file behind the `Tokenizer` interface.

  Models from `train_sentencepiece` round-trip any text exactly (identity normalisation,
  no dummy prefix, whitespace kept, byte fallback). Other models load too, with whatever
  normalisation they were trained with. `decode` drops pad/bos and stops at the first EOS.
  """

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"SentencePiece model {model_path!r} does not exist; train one with "
          "train_sentencepiece(...) or point the tokenizer model path at an existing .model.")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{model_path!r} is not a readable SentencePiece model ({e}); if it is "
                       "a cached tokenizer, delete it to retrain.") from e
    self.pad_id, self.bos_id = self._sp.pad_id(), self._sp.bos_id()
    self.eos_id, self.vocab_size = self._sp.eos_id(), self._sp.get_piece_size()
    if self.pad_id < 0:
      # Many released models (LLaMA's among them) define no pad piece; the usual stand-in is
      # unk, which byte-fallback models never emit.
      self.pad_id = self._sp.unk_id()
    for field in ("pad_id", "bos_id", "eos_id"):
      if getattr(self, field) < 0:
        raise ValueError(
            f"SentencePiece model {model_path!r} has no {field[:-3]} piece ({field} = -1); "
            "retrain it with train_sentencepiece, which always defines pad, bos and eos.")
    if self.pad_id == self.eos_id:
      raise ValueError(
          f"SentencePiece model {model_path!r} uses id {self.pad_id} for both pad and eos; "
          "a padded position would read as end of text. Retrain with distinct ids.")
    byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    # Without byte pieces there is no exact spelling of "▁"; let SentencePiece handle it.
    has_bytes = all(self._sp.is_byte(i) for i in byte_ids)
    self._mark_ids = byte_ids if has_bytes else None

  def encode(self, text: str) -> list[int]:
    if self._mark_ids is None or _SPACE_MARK not in text:
      return self._sp.encode(text)
    ids: list[int] = []
    for k, part in enumerate(text.split(_SPACE_MARK)):
      if k:
        ids.extend(self._mark_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def encode_prompt(self, text: str) -> list[int]:
    return self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    kept = content_ids(self, ids)
    for i in kept:
      if not 0 <= i < self.vocab_size:
        raise ValueError(
            f"token id {i} is outside the SentencePiece vocabulary [0, {self.vocab_size}) of "
            f"{self.model_path!r}; was the model's vocab_size padded past the tokenizer's?")
    return self._sp.decode(kept)


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Texts cut to at most `max_bytes` UTF-8 bytes: the trainer silently skips longer ones."""
  for text in texts:
    if not isinstance(text, str):
      raise TypeError(f"tokenizer corpus must yield str, got {type(text).__name__}: {text!r:.80}")
    if not text:
      continue
    if len(text.encode("utf-8")) <= max_bytes:
      yield text
      continue
    for line in text.splitlines(keepends=True):
      if len(line.encode("utf-8")) <= max_bytes:
        yield line
      else:
        step = max_bytes // 4  # A character is at most 4 UTF-8 bytes.
        yield from (line[k:k + step] for k in range(0, len(line), step))


def _sample(sentences: Iterable[str], size: int, seed: int) -> list[str]:
  """A uniform sample of `size` sentences, in corpus order (reservoir sampling).

  Done here rather than by the trainer (input_sentence_size): SentencePiece 0.2's own
  sampling differs from process to process whatever seed it is given.
  """
  rng = random.Random(seed)
  kept: list[tuple[int, str]] = []
  for n, sentence in enumerate(sentences):
    if n < size:
      kept.append((n, sentence))
    else:
      slot = rng.randrange(n + 1)
      if slot < size:
        kept[slot] = (n, sentence)
  return [sentence for _, sentence in sorted(kept)]


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", character_coverage: float = 0.9995,
                        input_sentence_size: int = 300_000, max_sentence_length: int = 4192,
                        seed: int = 0, hard_vocab_limit: bool = True,
                        **trainer_options) -> str:
  """Trains a SentencePiece model on `texts` and writes it to `<model_prefix>.model`.

  Special ids match ByteTokenizer: pad 0, bos 1, eos 2 (and unk 3, never produced thanks to
  byte fallback). At most `input_sentence_size` sentences are used, sampled with `seed`;
  with one thread the same corpus gives the same file, byte for byte, wherever it is
  written, so hosts that train independently agree. The file is written under a temporary
  name and renamed, so a crash never leaves a half-written model behind. `trainer_options`
  go to SentencePieceTrainer as they are. Returns the path of the `.model` file.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type is {model_type!r}; choose 'bpe' or 'unigram'.")
  path = model_prefix + ".model"
  out_dir = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"cannot write {path}: directory {out_dir} does not exist.")
  sentences = _sample(_sentences(texts, max_sentence_length), input_sentence_size, seed)
  if not sentences:
    raise ValueError(f"tokenizer corpus for {path} is empty: nothing to train on.")
  options = dict(
      model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=max_sentence_length, num_threads=1, hard_vocab_limit=hard_vocab_limit,
      minloglevel=1)  # Warnings only: the trainer's progress log runs to hundreds of lines.
  options.update(trainer_options)
  # model_writer rather than model_prefix: the trainer stores model_prefix inside the model,
  # which would make the bytes depend on the (temporary) path.
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(sentences), model_writer=proto,
                                   **options)
  except RuntimeError as e:
    hint = ""
    if "Vocabulary size" in str(e):
      hint = (" Choose a vocab_size this corpus supports (byte fallback alone needs 260 + the "
              "number of distinct characters), or call train_sentencepiece with "
              "hard_vocab_limit=False to accept fewer pieces.")
    raise ValueError(f"SentencePiece training for {path} failed: {e}{hint}") from e
  atomic_write(path, proto.getvalue())
  return path


TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")


def get_tokenizer(kind: str, workdir: str | None, corpus: Callable[[], Iterable[str]] | None,
                  vocab_size: int, model_path: str = "", *, model_type: str = "bpe",
                  chat: bool = False) -> Tokenizer:
  """The tokenizer a run uses.

  kind "byte": ByteTokenizer (the other arguments are unused). kind "sentencepiece": the
  model at `model_path` if given; else the cached `<workdir>/tokenizer/spm.model`; else one
  trained on `corpus()` and cached there, so a resumed or later stage of the same run reuses
  exactly the same vocabulary. kind "hf": the Hugging Face tokenizer of an imported model at
  `model_path` (see hf_tokenizer.py; `vocab_size` is the model's own), prompts in its chat
  template when `chat`.
  """
  if chat and kind != "hf":
    raise ValueError(f"tokenizer.chat needs a chat template, which only tokenizer.kind='hf' "
                     f"has (kind is {kind!r}).")
  if kind == "hf":
    if not model_path:
      raise ValueError("tokenizer.kind='hf' needs tokenizer.model_path: a Hugging Face tokenizer "
                       "directory, a GGUF file, or a bundled model name.")
    cache = os.path.join(workdir, "tokenizer") if workdir else None
    return hf_tokenizer.load(model_path, chat, cache)
  if kind == "byte":
    return ByteTokenizer()
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer kind is {kind!r}; choose one of {TOKENIZER_KINDS}.")
  if model_path:
    return SentencePieceTokenizer(model_path)
  if not workdir:
    raise ValueError("a sentencepiece tokenizer needs a model_path, or a workdir to train and "
                     "cache one in (<workdir>/tokenizer/spm.model).")
  cached = os.path.join(workdir, "tokenizer", "spm.model")
  if os.path.exists(cached):
    tok = SentencePieceTokenizer(cached)
    if tok.vocab_size != vocab_size:
      raise ValueError(
          f"cached tokenizer {cached} has vocab_size {tok.vocab_size}, but {vocab_size} was "
          "asked for; delete the file to retrain, or use a fresh workdir.")
    return tok
  if corpus is None:
    raise ValueError(f"no tokenizer at {cached} and no corpus to train one on; pass a corpus "
                     "or a model_path.")
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  train_sentencepiece(corpus(), cached[:-len(".model")], vocab_size, model_type=model_type)
  return SentencePieceTokenizer(cached)


def describe(tok: Tokenizer) -> dict:
  """A JSON description that `from_description` turns back into the same tokenizer."""
  if isinstance(tok, ByteTokenizer):
    return {"kind": "byte"}
  if isinstance(tok, SentencePieceTokenizer):
    return {"kind": "sentencepiece", "model_path": os.path.abspath(tok.model_path)}
  if isinstance(tok, hf_tokenizer.HFTokenizer):
    return {"kind": "hf", "model_path": tok.directory, "chat": tok.chat}
  raise TypeError(f"cannot describe tokenizer of type {type(tok).__name__}.")


def from_description(desc: dict) -> Tokenizer:
  if desc.get("kind") == "byte":
    return ByteTokenizer()
  if desc.get("kind") == "sentencepiece":
    return SentencePieceTokenizer(desc["model_path"])
  if desc.get("kind") == "hf":
    return hf_tokenizer.HFTokenizer(desc["model_path"], chat=desc.get("chat", False))
  raise ValueError(f"unknown tokenizer description {desc!r}.")
