"""Hugging Face `tokenizers` behind the tokenizer interface, for imported models.

Sources: a Hugging Face tokenizer directory (`tokenizer.json`, plus `tokenizer_config.json`
for the special tokens and the chat template), or a GGUF file, whose byte-level BPE is
rebuilt from its metadata (`tokenizer.ggml.tokens` / `merges` / `token_type`, the
pre-tokenizer named by `tokenizer.ggml.pre`) and written out once as such a directory.

With `chat=True` a prompt is the user turn of the model's own chat template (rendered with
Jinja, as transformers' `apply_chat_template(add_generation_prompt=True)` does), so
completions are assistant turns; EOS is then the end-of-turn token (ChatML `<|im_end|>`).
Pad must differ from EOS: when a model declares pad = EOS (SmolLM2 does), the unknown
token, else the first special token that is neither EOS nor BOS, pads instead.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Sequence

from rlhf_jax.data.token_ids import content_ids
from rlhf_jax.fileio import write_json

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names whose regexes we rebuild: digits one by one, then GPT-2's.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRE = ("gpt2",)


def _content(token) -> str | None:
  """tokenizer_config.json stores a special token as a string or an AddedToken dict."""
  return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the special ids and chat template of its model."""

  def __init__(self, directory: str, chat: bool = False):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    if os.path.isfile(directory) and os.path.basename(directory) == "tokenizer.json":
      directory = os.path.dirname(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory}: no tokenizer.json; expected a Hugging Face tokenizer "
                              "directory or a GGUF file.")
    self.directory, self.chat = os.path.abspath(directory), chat
    self._tk = Tokenizer.from_file(path)
    config = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
    self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._id(config, "eos_token", required=True)
    self.bos_id = self._id(config, "bos_token")
    self.pad_id = self._pad_id(config)
    if self.bos_id is None:  # Qwen2 has none; nothing adds it, decode drops it like pad.
      self.bos_id = self.pad_id
    self._special_text = {k: _content(config.get(k)) or "" for k in ("bos_token", "eos_token")}
    self._template = None
    template_src = self._template_source(directory, config)
    if chat:
      if not template_src:
        raise ValueError(f"{directory}: tokenizer.chat=True, but the tokenizer has no chat template "
                         "(tokenizer_config.json `chat_template` or chat_template.jinja).")
      self._template = _compile_template(template_src)

  def _id(self, config: dict[str, Any], key: str, required: bool = False) -> int | None:
    text = _content(config.get(key))
    if text is None:
      if required:
        raise ValueError(f"{self.directory}: tokenizer_config.json declares no {key}; an imported "
                         "tokenizer needs one to end completions.")
      return None
    token_id = self._tk.token_to_id(text)
    if token_id is None:
      raise ValueError(f"{self.directory}: {key} {text!r} is not in the vocabulary.")
    return token_id

  def _pad_id(self, config: dict[str, Any]) -> int:
    pad = self._id(config, "pad_token")
    if pad is not None and pad != self.eos_id:
      return pad
    unk = self._id(config, "unk_token")
    if unk is not None and unk != self.eos_id:
      return unk
    for token_id, added in sorted(self._tk.get_added_tokens_decoder().items()):
      if added.special and token_id not in (self.eos_id, self.bos_id):
        return token_id
    raise ValueError(f"{self.directory}: no token can pad: pad is missing or equals EOS, and "
                     "there is no unknown or other special token. Padding with EOS would make "
                     "every pad read as an end of text.")

  @staticmethod
  def _template_source(directory: str, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):  # transformers >= 4.47 writes it beside the config
      with open(jinja_path) as f:
        return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` as it is: no BOS/EOS added; special-token text is recognised."""
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_prompt(self, text: str) -> list[int]:
    """The prompt as the model expects it: a chat user turn followed by the assistant header
    (`chat=True`), else the text with whatever the tokenizer adds in front (e.g. BOS)."""
    if self._template is None:
      return self._tk.encode(text, add_special_tokens=True).ids
    return self.encode(self.render_chat(text))

  def render_chat(self, text: str) -> str:
    return self._template.render(messages=[{"role": "user", "content": text}],
                                 add_generation_prompt=True, **self._special_text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, up to the first EOS, without pad/BOS (other special tokens are kept)."""
    return self._tk.decode(content_ids(self, ids), skip_special_tokens=False)


def _compile_template(source: str):
  # The environment transformers renders chat templates in.
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


def gguf_tokenizer_files(path: str) -> tuple[str, dict[str, Any]]:
  """(tokenizer.json text, tokenizer_config.json dict) rebuilt from a GGUF file's metadata."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top,g-multiple-import

  from rlhf_jax.models import gguf_import  # pylint: disable=g-import-not-at-top
  reader = gguf_import.open_reader(path)

  def field(key, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default

  kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "gpt2")
  if kind != "gpt2":
    raise NotImplementedError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only "
                              "byte-level BPE, 'gpt2'); point tokenizer.model_path at the model's "
                              "Hugging Face tokenizer directory instead.")
  if pre not in _DIGIT_SPLIT_PRE + _GPT2_PRE:
    raise NotImplementedError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                              f"{_DIGIT_SPLIT_PRE + _GPT2_PRE}); point tokenizer.model_path at the "
                              "model's Hugging Face tokenizer directory instead.")
  tokens = field("tokenizer.ggml.tokens")
  types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
  tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:  # llama.cpp splits every \p{N} off first
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
  else:
    tk.pre_tokenizer = byte_level
  tk.decoder = decoders.ByteLevel()
  tk.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                 for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])

  def token(key):
    i = field(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  bos = token("bos")
  if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokens.index(bos))])
  config = {"bos_token": bos, "eos_token": token("eos"), "unk_token": token("unknown"),
            "pad_token": token("padding"), "chat_template": field("tokenizer.chat_template"),
            "source": os.path.abspath(path)}
  return tk.to_str(), config


def _file_id(path: str) -> dict[str, Any]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def tokenizer_dir_from_gguf(path: str, cache_dir: str) -> str:
  """`<cache_dir>/<file stem>/`, a Hugging Face tokenizer directory rebuilt from the GGUF
  file once; reused while the file's path, size and mtime are unchanged."""
  out = os.path.join(cache_dir, os.path.splitext(os.path.basename(path))[0])
  stamp = os.path.join(out, "source.json")
  if os.path.isfile(stamp):
    with open(stamp) as f:
      if json.load(f) == _file_id(path):
        return out
  tokenizer_json, config = gguf_tokenizer_files(path)
  # Written beside and renamed, so a crash never leaves a half-converted tokenizer.
  tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tokenizer_json)
    write_json(os.path.join(tmp, "tokenizer_config.json"), config)
    write_json(os.path.join(tmp, "source.json"), _file_id(path))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return out


def load(model_path: str, chat: bool, cache_dir: str | None) -> HFTokenizer:
  """The tokenizer of a Hugging Face directory / tokenizer.json, a GGUF file, or a bundled
  model name (see `rlhf_jax.models.pretrained.resolve`). A GGUF tokenizer is converted into
  `cache_dir` (a temporary folder when there is none)."""
  from rlhf_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  path = pretrained.resolve(model_path)
  if path.endswith(".gguf"):
    if cache_dir is None:
      import tempfile  # pylint: disable=g-import-not-at-top
      cache_dir = tempfile.mkdtemp(prefix="rlhf_jax_tokenizer_")
    os.makedirs(cache_dir, exist_ok=True)
    path = tokenizer_dir_from_gguf(path, cache_dir)
  return HFTokenizer(path, chat=chat)
