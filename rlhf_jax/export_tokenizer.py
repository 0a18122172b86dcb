"""The tokenizer files of a Hugging Face export (`rlhf_jax.export`), for each tokenizer kind.

* "hf": the run's own `tokenizer.json`, copied byte for byte, and a `tokenizer_config.json`
  for `PreTrainedTokenizerFast` naming the run's special tokens (its pad, which differs from
  EOS even where the source declared pad = EOS) and, when the run used it
  (`tokenizer.chat=true`), the chat template.
* "sentencepiece": the `.model` file as `tokenizer.model` and a `tokenizer_config.json` for
  transformers' `LlamaTokenizer`, which rebuilds a byte-fallback BPE with no normaliser from
  it: models with another normaliser are not written (it would segment differently).
* "byte": a `tokenizer.json` equal to `ByteTokenizer`: 259 tokens, `<pad>` 0, `<s>` 1,
  `</s>` 2, byte b as `<0xBB>` = b + 3 (a BPE with no merges and byte fallback).

When transformers is installed the written tokenizer is loaded back and must encode probe
texts (and the chat prompt) exactly as the run's tokenizer does; if it does not, its files
are removed again and the reason is reported, so an export never ships a tokenizer that
silently disagrees with the model's training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from rlhf_jax.data import hf_tokenizer, tokenizer as tokenizer_lib

PROBES = ("Hello, world! 12 apples cost $3.50.", "  two  spaces,\ttabs\nand lines",
          "naïve café, ünïcödé 😀")
BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ByteTokenizer's ids 0, 1, 2


@dataclasses.dataclass
class Written:
  """What `write` put in the export folder, and lines for the user (notes, reasons)."""
  files: list[str]
  notes: list[str]
  bos_id: int | None  # for config.json; None where the tokenizer declares no BOS
  eos_id: int
  pad_id: int


def write(tok, out_dir: str, max_length: int) -> Written:
  """Writes the tokenizer of a run into `out_dir` (see the module docstring)."""
  kind = tokenizer_lib.describe(tok)["kind"]
  out = Written([], [], tok.bos_id, tok.eos_id, tok.pad_id)
  if kind == "byte":
    out.files = _write_byte(out_dir, max_length)
  elif kind == "sentencepiece":
    out.files, reason = _write_sentencepiece(tok, out_dir, max_length)
    if reason:
      out.notes.append(f"tokenizer (sentencepiece) NOT written: {reason}; {tok.model_path} is "
                       "the run's tokenizer.")
      return out
  else:
    out.files, out.bos_id = _write_hf(tok, out_dir, max_length)
  _verify(tok, out_dir, out)
  return out


def _config(specials: dict, max_length: int, **extra) -> dict:
  return {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
          "clean_up_tokenization_spaces": False, "model_max_length": max_length, **extra}


def _write_json(out_dir: str, name: str, obj) -> str:
  with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  return name


def _write_byte(out_dir: str, max_length: int) -> list[str]:
  """ByteTokenizer as a tokenizers BPE: no merges, so every character falls back to its
  UTF-8 bytes, `<0xBB>` at id b + 3; decoding fuses the bytes back into text."""
  # pylint: disable-next=g-import-not-at-top,g-multiple-import
  from tokenizers import AddedToken, Tokenizer, decoders, models
  vocab = {name: i for i, name in enumerate(BYTE_SPECIALS)}
  vocab.update({f"<0x{b:02X}>": b + len(BYTE_SPECIALS) for b in range(256)})
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
  tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
  tk.save(os.path.join(out_dir, "tokenizer.json"))
  pad, bos, eos = BYTE_SPECIALS
  return ["tokenizer.json", _write_json(out_dir, "tokenizer_config.json", _config(
      {"bos_token": bos, "eos_token": eos, "pad_token": pad}, max_length))]


def _write_sentencepiece(tok, out_dir: str, max_length: int) -> tuple[list[str], str]:
  """(files, "") or ([], why not): the `.model` file plus a LlamaTokenizer config."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=tok.model_path)
  proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
  norm = proto.normalizer_spec
  if norm.name != "identity" or norm.remove_extra_whitespaces:
    return [], (f"its normaliser is {norm.name!r} (remove_extra_whitespaces="
                f"{norm.remove_extra_whitespaces}), and transformers' LlamaTokenizer applies "
                "none, so it would segment text differently")
  shutil.copyfile(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
  specials = {"bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id),
              "pad_token": sp.id_to_piece(tok.pad_id)}
  if sp.unk_id() >= 0:
    specials["unk_token"] = sp.id_to_piece(sp.unk_id())
  # Our encode adds no BOS/EOS; a dummy prefix "▁" only where the model was trained with one.
  config = _config(specials, max_length, tokenizer_class="LlamaTokenizer", add_bos_token=False,
                   add_eos_token=False, legacy=False,
                   add_prefix_space=bool(norm.add_dummy_prefix))
  return ["tokenizer.model", _write_json(out_dir, "tokenizer_config.json", config)], ""


def _write_hf(tok, out_dir: str, max_length: int) -> tuple[list[str], int | None]:
  """(files, BOS id or None): the run's tokenizer.json as it is, and a config with the run's
  special tokens. A tokenizer that declares no BOS (Qwen2) gets none, although HFTokenizer
  reuses its pad id as `bos_id` (which nothing adds)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  src = os.path.join(tok.directory, "tokenizer.json")
  shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
  source_config = {}
  config_path = os.path.join(tok.directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      source_config = json.load(f)
  tk = Tokenizer.from_file(src)
  bos = hf_tokenizer._content(source_config.get("bos_token"))  # pylint: disable=protected-access
  specials = {"bos_token": bos, "eos_token": tk.id_to_token(tok.eos_id),
              "pad_token": tk.id_to_token(tok.pad_id)}
  unk = hf_tokenizer._content(source_config.get("unk_token"))  # pylint: disable=protected-access
  if unk is not None:
    specials["unk_token"] = unk
  extra = {}
  if tok.chat:
    # pylint: disable-next=protected-access
    extra["chat_template"] = hf_tokenizer.HFTokenizer._template_source(tok.directory,
                                                                       source_config)
  length = source_config.get("model_max_length")
  length = length if isinstance(length, int) and length < 10**9 else max_length
  files = ["tokenizer.json", _write_json(out_dir, "tokenizer_config.json",
                                         _config(specials, length, **extra))]
  return files, None if bos is None else tok.bos_id


def _verify(tok, out_dir: str, out: Written) -> None:
  """Loads the written tokenizer with transformers (when installed) and compares it with the
  run's on `PROBES` and the chat prompt; a mismatch removes the files again."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    out.notes.append("tokenizer not checked against transformers (not installed).")
    return
  kind = tokenizer_lib.describe(tok)["kind"]
  try:
    hf = transformers.AutoTokenizer.from_pretrained(out_dir)
    problem = _mismatch(tok, hf)
  except Exception as e:  # pylint: disable=broad-except  # any failure to load is a verdict
    why = " ".join(str(e).split())[:200]
    problem = f"transformers cannot load it ({type(e).__name__}: {why})"
  if not problem:
    out.notes.append(f"tokenizer ({kind}) checked: transformers {transformers.__version__} "
                     f"{type(hf).__name__} encodes {len(PROBES)} probe texts"
                     f"{' and the chat prompt' if getattr(tok, 'chat', False) else ''} as the "
                     "run does.")
    return
  for name in out.files:
    os.remove(os.path.join(out_dir, name))
  out.notes.append(f"tokenizer ({kind}) NOT written: {problem}.")
  out.files = []


def _mismatch(tok, hf) -> str:
  """'' if `hf` (a transformers tokenizer) encodes like `tok`, else what differs."""
  ids = (hf.pad_token_id, hf.eos_token_id)
  if ids != (tok.pad_id, tok.eos_id):
    return f"its (pad, eos) ids are {ids}, the run's ({tok.pad_id}, {tok.eos_id})"
  for text in PROBES:
    got, want = hf.encode(text, add_special_tokens=False), tok.encode(text)
    if list(got) != list(want):
      return f"it encodes {text!r} as {list(got)[:12]}..., the run as {list(want)[:12]}..."
  if getattr(tok, "chat", False):
    got = hf.apply_chat_template([{"role": "user", "content": PROBES[0]}],
                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    if list(got) != tok.encode_prompt(PROBES[0]):
      return "its chat template renders the prompt differently"
  elif list(hf.encode(PROBES[0])) != tok.encode_prompt(PROBES[0]):  # e.g. a BOS added or not
    return "with its special tokens added it encodes a prompt differently"
  return ""
