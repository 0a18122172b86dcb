"""Metrics of a stage: the JSONL + TensorBoard writer, the non-finite guard, means.

Metrics go to `<workdir>/metrics.jsonl` (one JSON object per logged step, with `stage` and
`step`) and to TensorBoard event files under `<workdir>/tensorboard/<stage>`. A non-finite
loss stops the run with the step number before parameters or checkpoints are corrupted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from rlhf_jax import fileio


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
    # Strict JSON: a non-finite value (e.g. the KL of a run with no iteration) is null.
    row.update({k: float(v) if math.isfinite(float(v)) else None for k, v in metrics.items()})
    # One write call per line: a crash cannot leave half a line behind a complete one.
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    except OSError as e:
      err = fileio.no_space_error(e, self.path)
      if err is e:
        raise
      raise err from e
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


def read_rows(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` (of one stage, if given), in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if stage is None or r.get("stage") == stage]


def check_finite(step: int, metrics: dict[str, float], keys=("loss", "grad_norm")):
  for k in keys:
    if k in metrics and not math.isfinite(metrics[k]):
      raise FloatingPointError(
          f"step {step}: {k} is {metrics[k]}. Stopping before the parameters are corrupted; "
          "lower optim.learning_rate, set optim.grad_clip, or use dtype float32.")


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}
