"""What every tokenizer backend's `decode` keeps of an id sequence.

Its own module so that tokenizer.py (the interface, the byte and SentencePiece backends and
the kind dispatch) and hf_tokenizer.py (the Hugging Face backend) both use it without
importing each other in a cycle.
"""

from __future__ import annotations

from typing import Sequence


def content_ids(tok, ids: Sequence[int]) -> list[int]:
  """The ids a decoder turns into text: up to the first EOS, without pad and BOS."""
  kept = []
  for i in ids:
    i = int(i)
    if i == tok.eos_id:
      break
    if i not in (tok.pad_id, tok.bos_id):
      kept.append(i)
  return kept
