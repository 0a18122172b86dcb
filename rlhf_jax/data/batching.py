"""Fixed-shape arrays from text records: every batch has the same shapes, so a step
compiles once.

SFT layout, one row:  [pad .. pad | prompt][completion EOS | pad .. pad]
                       <- max_prompt_len -><--- max_completion_len --->
Prompts are left-padded so that generation (PPO) continues right after the last prompt
token; completions are right-padded. Too-long prompts keep their end, too-long completions
keep their start (and lose the EOS); both are counted, never silent. Errors name a record
by its source and 1-based number ("train.jsonl: record 3"), like `sources` names file:line.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.sources import check_record
from rlhf_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class TruncationCounts:
  prompts: int = 0
  completions: int = 0


def sft_arrays(records: Sequence[dict[str, str]], tok: Tokenizer, max_prompt_len: int,
               max_completion_len: int, counts: TruncationCounts | None = None,
               truncation: str = "truncate", loss_on: str = "completion",
               source: str = "records") -> dict[str, np.ndarray]:
  """tokens/mask/loss_mask [N, P + C].

  `loss_mask` marks the completion tokens incl. EOS (`loss_on="completion"`) or every real
  token (`"all"`). `truncation="error"` turns an over-long record into an error naming it.
  """
  if truncation not in ("truncate", "error"):
    raise ValueError(f"data.truncation is {truncation!r}; choose 'truncate' or 'error'.")
  if loss_on not in ("completion", "all"):
    raise ValueError(f"data.loss_on is {loss_on!r}; choose 'completion' or 'all'.")
  n, p, c = len(records), max_prompt_len, max_completion_len
  tokens = np.full((n, p + c), tok.pad_id, np.int32)
  mask = np.zeros((n, p + c), np.int32)
  loss_mask = np.zeros((n, p + c), np.int32)
  for i, rec in enumerate(records):
    where = f"{source}: record {i + 1}"
    for key in ("prompt", "completion"):
      if not isinstance(rec.get(key), str):
        raise ValueError(f"{where}: field {key!r} must be a string, got "
                         f"{rec.get(key)!r}.")
    prompt = tok.encode_prompt(rec["prompt"])
    completion = tok.encode(rec["completion"]) + [tok.eos_id]
    if not prompt:
      raise ValueError(f"{where}: empty prompt.")
    for name, ids, limit in (("prompt", prompt, p), ("completion", completion, c)):
      if len(ids) > limit and truncation == "error":
        raise ValueError(f"{where}: {name} is {len(ids)} tokens, over the limit "
                         f"{limit} (data.max_{name}_len); raise it or set "
                         "data.truncation='truncate'.")
    if len(prompt) > p:
      prompt = prompt[-p:]
      if counts: counts.prompts += 1
    if len(completion) > c:
      completion = completion[:c]
      if counts: counts.completions += 1
    tokens[i, p - len(prompt):p] = prompt
    mask[i, p - len(prompt):p] = 1
    tokens[i, p:p + len(completion)] = completion
    mask[i, p:p + len(completion)] = 1
    if loss_on == "all":
      loss_mask[i] = mask[i]
    else:
      loss_mask[i, p:p + len(completion)] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def check_batches(n: int, batch_size: int, process_count: int, source: str = "",
                  batch_key: str = "batch_size") -> None:
  """`n` records make batches of `batch_size` split over `process_count` processes; one
  error naming `source` and the config key `batch_key` otherwise."""
  if batch_size < 1:
    raise ValueError(f"{batch_key} is {batch_size}; it must be >= 1.")
  if n < batch_size:
    raise ValueError(f"{source or 'dataset'}: {n} records, fewer than one batch of "
                     f"{batch_size} ({batch_key}); give more records or a smaller batch.")
  if batch_size % process_count:
    raise ValueError(f"{batch_key} {batch_size} must divide by the {process_count} "
                     "processes; choose a multiple of the process count.")


class EpochIterator:
  """Deterministic shuffled batches over an in-memory dataset, epoch after epoch.

  The order depends only on (seed, epoch), never on the number of processes: each process
  takes its contiguous slice of every global batch (`process_index`/`process_count`), and
  the slices are assembled into one global array by `sharding.shard_batch`. `position`
  (global batches served) is saved in checkpoints, so a resumed run continues exactly.
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, source: str = "",
               batch_key: str = "batch_size"):
    """`source` names where the records came from (a file, `task:sort/train`) and
    `batch_key` the config key of `batch_size` (e.g. `sft.data.batch_size`), for errors."""
    self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
    self.n = len(next(iter(arrays.values())))
    check_batches(self.n, batch_size, process_count, source, batch_key)
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.position = 0

  def __next__(self) -> dict[str, np.ndarray]:
    per_epoch = self.n // self.batch_size
    epoch, k = divmod(self.position, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    idx = order[k * self.batch_size:(k + 1) * self.batch_size]
    idx = idx[self.offset:self.offset + self.local]
    self.position += 1
    return {key: v[idx] for key, v in self.arrays.items()}

  def __iter__(self):
    return self


@dataclasses.dataclass
class PreferenceCounts:
  kept: int = 0
  identical: int = 0  # chosen == rejected: no signal, dropped (or an error)
  truncated: int = 0  # a response longer than max_completion_len (or an error)
  truncated_prompts: int = 0  # a prompt longer than max_prompt_len: its end is kept


def preference_arrays(records: Sequence[dict[str, str]], tok: Tokenizer, max_prompt_len: int,
                      max_completion_len: int, counts: PreferenceCounts | None = None,
                      bad_pairs: str = "drop", source: str = "records"
                      ) -> dict[str, np.ndarray]:
  """chosen/rejected tokens + masks [N, P + C] in the SFT layout, and a per-pair `margin`.

  `bad_pairs="drop"` drops identical pairs and truncates over-long prompts (keeping their
  end) and responses, counting each; `"error"` raises on the first one, naming the record. An optional numeric
  `margin` field of a record becomes the Bradley-Terry margin (default 0).
  """
  if bad_pairs not in ("drop", "error"):
    raise ValueError(f"data.bad_pairs is {bad_pairs!r}; choose 'drop' or 'error'.")
  counts = counts if counts is not None else PreferenceCounts()
  kept, margins = [], []
  for i, rec in enumerate(records):
    where = f"{source}: record {i + 1}"
    rec = check_record(rec, "preference", where)
    if len(tok.encode_prompt(rec["prompt"])) > max_prompt_len:
      if bad_pairs == "error":
        raise ValueError(f"{where}: prompt is over data.max_prompt_len "
                         f"({max_prompt_len} tokens); raise it or set data.bad_pairs='drop' "
                         "to keep the prompt's end.")
      counts.truncated_prompts += 1
    if rec["chosen"] == rec["rejected"]:
      if bad_pairs == "error":
        raise ValueError(f"{where}: chosen and rejected are identical; remove the "
                         "pair or set data.bad_pairs='drop'.")
      counts.identical += 1
      continue
    for key in ("chosen", "rejected"):
      if len(tok.encode(rec[key])) + 1 > max_completion_len:
        if bad_pairs == "error":
          raise ValueError(f"{where}: {key} is over data.max_completion_len "
                           f"({max_completion_len} tokens incl. EOS); raise it or set "
                           "data.bad_pairs='drop' to truncate.")
        counts.truncated += 1
        break
    kept.append(rec)
    margins.append(float(rec.get("margin", 0.0)))
  counts.kept += len(kept)
  out = {}
  for key in ("chosen", "rejected"):
    arr = sft_arrays([{"prompt": r["prompt"], "completion": r[key]} for r in kept], tok,
                     max_prompt_len, max_completion_len, source=source)
    out[f"{key}_tokens"], out[f"{key}_mask"] = arr["tokens"], arr["mask"]
  out["margin"] = np.asarray(margins, np.float32)
  return out


def prompt_arrays(prompts: Sequence[str], tok: Tokenizer, max_prompt_len: int,
                  counts: TruncationCounts | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompt tokens/mask [N, P], ready for generation (keeps each prompt's end)."""
  tokens = np.full((len(prompts), max_prompt_len), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), max_prompt_len), np.int32)
  for i, text in enumerate(prompts):
    ids = tok.encode_prompt(text)
    if len(ids) > max_prompt_len:
      ids = ids[-max_prompt_len:]
      if counts: counts.prompts += 1
    tokens[i, max_prompt_len - len(ids):] = ids
    mask[i, max_prompt_len - len(ids):] = 1
  return {"tokens": tokens, "mask": mask}
