"""The loop around a jitted step: progress bar, metrics files, checkpoints, NaN guard.

Metrics go to `<workdir>/metrics.jsonl` (one JSON object per logged step, with `stage` and
`step`) and to TensorBoard event files under `<workdir>/tensorboard/<stage>`. A non-finite
loss stops the run with the step number before parameters or checkpoints are corrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from absl import logging

from rlhf_jax.train.checkpoint import Checkpointer


class MetricsWriter:
  """JSONL + TensorBoard; no-op without a workdir. Only process 0 writes."""

  def __init__(self, workdir: str | None, stage: str):
    self.stage = stage
    self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
    self._tb = None
    if workdir and jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.path or jax.process_index() != 0:
      return
    row = {"stage": self.stage, "step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    # One write call per line: a crash cannot leave half a line behind a complete one.
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(f"{self.stage}/{k}", float(v), int(step))
    self._tb.flush()

  def drop_after(self, step: int):
    """On resume: forget this stage's rows logged after the checkpoint we restart from."""
    if not self.path or not os.path.exists(self.path) or jax.process_index() != 0:
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    keep = [r for r in rows
            if not (json.loads(r)["stage"] == self.stage and json.loads(r)["step"] > step)]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def check_finite(step: int, metrics: dict[str, float], keys=("loss",)):
  for k in keys:
    if k in metrics and not math.isfinite(metrics[k]):
      raise FloatingPointError(
          f"step {step}: {k} is {metrics[k]}. Stopping before the parameters are corrupted; "
          "lower optim.learning_rate, set optim.grad_clip, or use dtype float32.")


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}


def train_loop(step_fn: Callable, state, batches, *, num_steps: int, log_every: int,
               writer: MetricsWriter, shard: Callable = lambda b: b,
               checkpointer: Checkpointer | None = None, tokens_per_batch: int = 0,
               eval_fn: Callable | None = None, eval_every: int = 0):
  """Runs from `state.step` to `num_steps`; returns (state, last logged metrics).

  `batches` is an iterator with a `position` attribute that is saved in checkpoints.
  """
  start = int(jax.device_get(state.step))
  last: dict[str, float] = {}
  t0 = window_start = time.perf_counter()
  window_steps = 0
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=writer.stage, unit="step",
                  disable=None if sys.stderr.isatty() and jax.process_index() == 0 else True,
                  dynamic_ncols=True)
  for i in range(start + 1, num_steps + 1):
    state, metrics = step_fn(state, shard(next(batches)))
    window_steps += 1
    bar.update(1)
    is_eval = bool(eval_fn and eval_every and (i % eval_every == 0 or i == num_steps))
    if i % log_every == 0 or i == num_steps or i == start + 1 or is_eval:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(i, metrics)
      elapsed = time.perf_counter() - window_start
      if tokens_per_batch and i > start + 1:  # the first step includes compilation
        metrics["tokens_per_s"] = tokens_per_batch * window_steps / max(elapsed, 1e-9)
      if is_eval:
        metrics.update(eval_fn(state))
      writer.write(i, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4g}")
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
      logging.info("[%s] step %d/%d (%.0fs) %s", writer.stage, i, num_steps,
                   time.perf_counter() - t0, shown)
      last = metrics
      window_start, window_steps = time.perf_counter(), 0
    if checkpointer is not None:
      checkpointer.maybe_save(i, state, {"data_position": batches.position},
                              force=i == num_steps)
  bar.close()
  if start >= num_steps and eval_fn:  # resumed a finished run: report its final eval
    last = eval_fn(state)
  return state, last


def resume(checkpointer: Checkpointer | None, state, batches, writer: MetricsWriter):
  """Restores the latest checkpoint (if any) into `state` and `batches`; returns state."""
  if checkpointer is None or checkpointer.latest_step() is None:
    return state
  state, meta = checkpointer.restore(state)
  batches.position = int(meta["data_position"])
  step = int(jax.device_get(state.step))
  writer.drop_after(step)
  logging.info("[%s] resumed from step %d", writer.stage, step)
  return state
