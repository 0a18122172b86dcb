"""Fixed-shape arrays from text records: every batch has the same shapes, so a step
compiles once.

SFT layout, one row:  [pad .. pad | prompt][completion EOS | pad .. pad]
                       <- max_prompt_len -><--- max_completion_len --->
Prompts are left-padded so that generation (PPO) continues right after the last prompt
token; completions are right-padded. Too-long prompts keep their end, too-long completions
keep their start (and lose the EOS); both are counted, never silent.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class TruncationCounts:
  prompts: int = 0
  completions: int = 0


def sft_arrays(records: Sequence[dict[str, str]], tok: Tokenizer, max_prompt_len: int,
               max_completion_len: int, counts: TruncationCounts | None = None
               ) -> dict[str, np.ndarray]:
  """tokens/mask/loss_mask [N, P + C]; loss_mask marks completion tokens (incl. EOS)."""
  n, p, c = len(records), max_prompt_len, max_completion_len
  tokens = np.full((n, p + c), tok.pad_id, np.int32)
  mask = np.zeros((n, p + c), np.int32)
  loss_mask = np.zeros((n, p + c), np.int32)
  for i, rec in enumerate(records):
    for key in ("prompt", "completion"):
      if not isinstance(rec.get(key), str):
        raise ValueError(f"SFT record {i}: field {key!r} must be a string, got {rec.get(key)!r}.")
    prompt = tok.encode(rec["prompt"])
    completion = tok.encode(rec["completion"]) + [tok.eos_id]
    if len(prompt) > p:
      prompt = prompt[-p:]
      if counts: counts.prompts += 1
    if len(completion) > c:
      completion = completion[:c]
      if counts: counts.completions += 1
    if not prompt:
      raise ValueError(f"SFT record {i}: empty prompt.")
    tokens[i, p - len(prompt):p] = prompt
    mask[i, p - len(prompt):p] = 1
    tokens[i, p:p + len(completion)] = completion
    mask[i, p:p + len(completion)] = 1
    loss_mask[i, p:p + len(completion)] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


class EpochIterator:
  """Deterministic shuffled batches over an in-memory dataset, epoch after epoch."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
    self.n = len(next(iter(arrays.values())))
    if self.n < batch_size:
      raise ValueError(f"dataset has {self.n} examples, fewer than batch_size {batch_size}.")
    self.position = 0  # batches served so far; saved with checkpoints to resume exactly.

  def __next__(self) -> dict[str, np.ndarray]:
    per_epoch = self.n // self.batch_size
    epoch, k = divmod(self.position, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    idx = order[k * self.batch_size:(k + 1) * self.batch_size]
    self.position += 1
    return {key: v[idx] for key, v in self.arrays.items()}

  def __iter__(self):
    return self
