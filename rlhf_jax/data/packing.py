"""Packed SFT rows: several (prompt, completion) examples back to back in one row.

Unpacked, an SFT row holds one example padded to max_prompt_len + max_completion_len (on
the bundled sentiment task a third of every row is padding, and every padded position costs
the same compute as a real one). Packed, a row holds the examples' real tokens end to end,
each one prompt then completion + EOS exactly as `batching.sft_arrays` cut them, and padding
only at the end of the row. Besides tokens / mask / loss_mask a packed batch carries

  segment_ids  1, 2, ... for the examples of a row, 0 on its padding: attention stays inside
               an example (`transformer.self_attention_mask`);
  positions    0, 1, ... restarting at each example: the positions it has unpacked (RoPE);
  loss_mask    each example's own, except at its first token: in a packed row the position
               before it belongs to another example, which cannot see it (unpacked with
               `sft.data.loss_on="all"`, a left pad predicts that token).

So, with completion-only loss, the masked token mean over a packed batch is the one over the
same examples unpacked, and each example's logits are its unpacked logits (tested).

Order: epoch e is the permutation of the examples drawn from (seed, e), as `EpochIterator`'s,
packed first-fit (each example goes into the first row with room for it), then its rows
shuffled by the same generator. The epochs form one stream of rows and batch k is rows
[kB, (k+1)B) of it: every example is in exactly one row per epoch, no row is dropped or
padded out, and a batch may straddle two epochs. A checkpoint saves `position` (batches
served) only; the packing of any epoch is recomputed from (seed, epoch).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.data import batching

# The arrays of a packed batch, each [B, T] int32.
PACKED_KEYS = ("tokens", "mask", "loss_mask", "segment_ids", "positions")


def example_spans(mask_NxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start, length) of each row's real tokens, which `sft_arrays` lays out as one run
  (the prompt ends where the completion starts); anything else is an error."""
  lengths_N = mask_NxL.sum(axis=1).astype(np.int64)
  starts_N = np.argmax(mask_NxL > 0, axis=1)
  ends_N = mask_NxL.shape[1] - np.argmax(mask_NxL[:, ::-1] > 0, axis=1)
  bad = np.flatnonzero((lengths_N == 0) | (ends_N - starts_N != lengths_N))
  if bad.size:
    raise ValueError(f"packing: row {bad[0]} is empty or its tokens are not one contiguous "
                     "run; pack the arrays of batching.sft_arrays.")
  return starts_N, lengths_N


def first_fit(lengths_N: np.ndarray, row_len: int) -> np.ndarray:
  """The row of each example when packed in this order, first-fit: [N] row ids, rows
  numbered in the order they are opened (all of 0 .. max used).

  A max-tree over the rows' free space finds the first row with room in O(log N): an epoch
  packs in O(N log N), not the O(N x rows) of a scan over the open rows (8192 sentiment
  examples: 0.02 s).
  """
  n = len(lengths_N)
  size = 1
  while size < n:
    size *= 2
  free = [row_len] * (2 * size)  # node: the most free space of a row below it
  row_of_N = np.empty(n, np.int64)
  for i, length in enumerate(lengths_N.tolist()):
    if not 0 < length <= row_len:
      raise ValueError(f"packing: example {i} has {length} tokens; rows hold 1..{row_len}.")
    node = 1
    while node < size:  # descend to the leftmost leaf (row) with room
      node = 2 * node if free[2 * node] >= length else 2 * node + 1
    row_of_N[i] = node - size
    free[node] -= length
    node //= 2
    while node:
      free[node] = max(free[2 * node], free[2 * node + 1])
      node //= 2
  return row_of_N


def pack_epoch(lengths_N: np.ndarray, row_len: int, seed: int, epoch: int
               ) -> list[np.ndarray]:
  """The rows of one epoch: per row, its example indices in the order they were placed.

  The rows are shuffled after packing: first-fit fills the rows it opened first best (on
  the sentiment task the epoch's first batch was 6% padding, its last 30%), and shuffled
  rows give every batch about the same number of examples.
  """
  rng = np.random.default_rng([seed, epoch])
  order_N = rng.permutation(len(lengths_N))
  row_of_N = first_fit(lengths_N[order_N], row_len)
  by_row = np.argsort(row_of_N, kind="stable")
  rows = np.split(order_N[by_row], np.cumsum(np.bincount(row_of_N))[:-1])
  return [rows[r] for r in rng.permutation(len(rows))]


def build_rows(arrays: dict[str, np.ndarray], starts_N: np.ndarray, lengths_N: np.ndarray,
               rows: Sequence[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """The packed arrays (`PACKED_KEYS`) of `rows`, each a list of example indices."""
  row_len = arrays["tokens"].shape[1]
  out = {k: np.zeros((len(rows), row_len), np.int32) for k in PACKED_KEYS}
  out["tokens"][:] = pad_id
  for r, examples in enumerate(rows):
    at = 0
    for seg, i in enumerate(examples, start=1):
      s, n = starts_N[i], lengths_N[i]
      out["tokens"][r, at:at + n] = arrays["tokens"][i, s:s + n]
      out["loss_mask"][r, at + 1:at + n] = arrays["loss_mask"][i, s + 1:s + n]
      out["segment_ids"][r, at:at + n] = seg
      out["positions"][r, at:at + n] = np.arange(n)
      at += n
    out["mask"][r, :at] = 1
  return out


class PackedIterator:
  """Deterministic packed batches of `batch_size` rows, epoch after epoch (the module
  docstring says how), with `EpochIterator`'s interface: `next()`, and `position` (global
  batches served), which a checkpoint saves and a resumed run sets. Each process takes its
  contiguous block of every global batch's rows (`process_index` / `process_count`)."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, source: str = "",
               batch_key: str = "batch_size", pad_id: int = 0):
    """`arrays`: the unpacked `sft_arrays` of the examples; `source` and `batch_key` name
    the records and the batch-size key in errors."""
    batching.check_batches(len(arrays["tokens"]), batch_size, process_count, source,
                           batch_key)
    self.arrays, self.batch_size, self.seed, self.pad_id = arrays, batch_size, seed, pad_id
    self.row_len = arrays["tokens"].shape[1]
    self.starts_N, self.lengths_N = example_spans(arrays["mask"])
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.position = 0
    self._rows: dict[int, list[np.ndarray]] = {}  # packed epochs kept (the last two used)
    self._num_rows: list[int] = []  # rows of epochs 0, 1, ... packed so far

  def epoch_rows(self, epoch: int) -> list[np.ndarray]:
    """The rows of `epoch` (lists of example indices), packed on first use."""
    if epoch not in self._rows:
      rows = pack_epoch(self.lengths_N, self.row_len, self.seed, epoch)
      self._rows = {e: r for e, r in self._rows.items() if e == epoch - 1}
      self._rows[epoch] = rows
      if epoch == len(self._num_rows):
        self._num_rows.append(len(rows))
    return self._rows[epoch]

  def _locate(self, row: int) -> tuple[int, int]:
    """(epoch, row within it) of the stream's `row`."""
    epoch = 0
    while True:
      if epoch == len(self._num_rows):
        self.epoch_rows(epoch)
      if row < self._num_rows[epoch]:
        return epoch, row
      row -= self._num_rows[epoch]
      epoch += 1

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, row = self._locate(self.position * self.batch_size + self.offset)
    rows: list[np.ndarray] = []
    while len(rows) < self.local:
      rows += self.epoch_rows(epoch)[row:row + self.local - len(rows)]
      epoch, row = epoch + 1, 0
    self.position += 1
    return build_rows(self.arrays, self.starts_N, self.lengths_N, rows, self.pad_id)

  def __iter__(self):
    return self

  def stats(self, epoch: int = 0) -> dict[str, float]:
    """Rows, padding share with and without packing, and examples per row of an epoch."""
    rows, tokens = len(self.epoch_rows(epoch)), int(self.lengths_N.sum())
    n = len(self.lengths_N)
    return {"rows": rows, "examples": n, "examples_per_row": n / rows,
            "padding_fraction": 1 - tokens / (rows * self.row_len),
            "padding_fraction_unpacked": 1 - tokens / (n * self.row_len)}
