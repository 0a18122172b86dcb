"""The tokenizer interface every stage uses, and a byte-level implementation.

Stages only touch `encode`, `decode`, `vocab_size` and the special ids, so a SentencePiece
or Hugging Face `tokenizers` backend drops in without changing them. Pad and EOS are
different ids on purpose: a padded position must never be mistaken for an end of text.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
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

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i >= self._OFFSET:
        out.append(i - self._OFFSET)
    return out.decode("utf-8", errors="replace")
