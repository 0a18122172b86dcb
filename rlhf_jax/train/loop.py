"""The loop around a jitted step: progress, metrics file, non-finite guard.

Metrics go to `<workdir>/metrics.jsonl`, one JSON object per logged step, and a progress
line is printed. A non-finite loss stops the run with the step number, rather than letting
NaNs spread into parameters and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging


class MetricsWriter:
  """Appends `{"step": .., "stage": .., **metrics}` lines to a JSONL file (if a path is given)."""

  def __init__(self, path: str | None, stage: str):
    self.path, self.stage = path, stage
    if path:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.path:
      return
    row = {"stage": self.stage, "step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def check_finite(step: int, metrics: dict[str, float], keys=("loss",)):
  for k in keys:
    if k in metrics and not math.isfinite(metrics[k]):
      raise FloatingPointError(
          f"step {step}: {k} is {metrics[k]}. Stopping before the parameters are corrupted; "
          "lower optim.learning_rate, set optim.grad_clip, or use dtype float32.")


def train_loop(step_fn: Callable, state, batches: Iterator, num_steps: int, log_every: int,
               writer: MetricsWriter, shard: Callable = lambda b: b, tokens_per_batch: int = 0,
               eval_fn: Callable | None = None, eval_every: int = 0):
  """Runs `num_steps` steps; returns (state, last logged metrics)."""
  last: dict[str, float] = {}
  t0, window_start = time.perf_counter(), time.perf_counter()
  for i in range(1, num_steps + 1):
    state, metrics = step_fn(state, shard(next(batches)))
    if i % log_every == 0 or i == num_steps or i == 1:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(i, metrics)
      elapsed = time.perf_counter() - window_start
      steps_in_window = 1 if i == 1 else (i % log_every or log_every)
      if tokens_per_batch and i > 1:  # step 1 includes compilation
        metrics["tokens_per_s"] = tokens_per_batch * steps_in_window / max(elapsed, 1e-9)
      if eval_fn and eval_every and (i % eval_every == 0 or i == num_steps):
        metrics.update(eval_fn(state))
      writer.write(i, metrics)
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
      logging.info("[%s] step %d/%d (%.0fs) %s", writer.stage, i, num_steps,
                   time.perf_counter() - t0, shown)
      last = metrics
      window_start = time.perf_counter()
  return state, last


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}
