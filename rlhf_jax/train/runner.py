"""The one runner of step-based stages (SFT, RM, PPO): metrics writer, checkpointer with
stage metadata, exact resume, the step loop with progress bar, eval hook, close.

A stage supplies `step_fn(i, state, batch) -> (state, metrics)` for step i = 1 .. num_steps
(SFT and RM: their jitted train step; PPO: one iteration) and an iterator of batches with a
`position` attribute. Checkpoints hold the `TrainState` plus JSON metadata: the batch
position, the step, and `carry`, a dict of numbers the step function updates between steps
(PPO's KL coefficient). Resuming restores all three, so a resumed run continues exactly as
an uninterrupted one (every stage derives its random keys from the seed and the step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import tqdm
from absl import logging

from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import MetricsWriter, check_finite

FINITE_KEYS = ("loss", "grad_norm")  # checked on every logged step and before every save


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
  """Metrics for JSON metadata: non-finite values as null (strict JSON)."""
  return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  log_every: int = 1
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  eval_every: int = 0

  @classmethod
  def from_section(cls, train, num_steps: int | None = None) -> "LoopConfig":
    """From a stage's `train` config section (`num_steps` when it is kept elsewhere)."""
    get = lambda k, default: train[k] if k in train else default
    return cls(num_steps=int(num_steps if num_steps is not None else train.num_steps),
               log_every=int(get("log_every", 1)),
               checkpoint_every=int(get("checkpoint_every", 0)),
               keep_checkpoints=int(get("keep_checkpoints", 2)),
               eval_every=int(get("eval_every", 0)))


class StageRunner:
  """Owns a stage's metrics writer and checkpointer; `run` resumes and loops; `close`."""

  def __init__(self, stage: str, workdir: str | None, loop: LoopConfig):
    self.stage = stage
    self.loop = loop
    self.writer = MetricsWriter(workdir, stage)
    self.checkpointer = None
    self.restored_metrics: dict[str, float] = {}  # the last logged metrics of a resumed run
    if workdir:
      self.checkpointer = Checkpointer(os.path.join(workdir, stage, "checkpoints"),
                                       loop.checkpoint_every, loop.keep_checkpoints)

  def resume(self, state, batches, carry: dict[str, Any]) -> tuple[Any, int]:
    """(state, step) of the latest checkpoint (batches and carry restored in place), or
    (state, 0) when there is none."""
    ckpt = self.checkpointer
    if ckpt is None or ckpt.latest_step() is None:
      return state, 0
    state, meta = ckpt.restore(state)
    batches.position = int(meta["data_position"])
    # Checkpoints written before the runner: PPO's held `iteration` and `kl_coef`.
    step = int(meta.get("step", meta.get("iteration", jax.device_get(state.step))))
    carry.update(meta.get("carry", {k: meta[k] for k in carry if k in meta}))
    self.restored_metrics = {k: float("nan") if v is None else v
                             for k, v in meta.get("metrics", {}).items()}
    self.writer.drop_after(step)
    logging.info("[%s] resumed from step %d", self.stage, step)
    return state, step

  def run(self, step_fn: Callable, state, batches, *, shard: Callable = lambda b: b,
          carry: dict[str, Any] | None = None, eval_fn: Callable | None = None,
          tokens_per_batch: int = 0, log_keys: Sequence[str] | None = None):
    """Resumes, runs to `num_steps`; returns (state, last logged metrics). A resumed
    finished run runs no step and reports the metrics saved with its last checkpoint,
    updated by `eval_fn`'s."""
    carry = {} if carry is None else carry
    loop = self.loop
    state, start = self.resume(state, batches, carry)
    last: dict[str, float] = {}
    t0 = window_start = time.perf_counter()
    window_steps = 0
    bar = tqdm.tqdm(total=loop.num_steps, initial=start, desc=self.stage, unit="step",
                    disable=None if sys.stderr.isatty() and jax.process_index() == 0 else True,
                    dynamic_ncols=True)
    for i in range(start + 1, loop.num_steps + 1):
      state, metrics = step_fn(i, state, shard(next(batches)))
      window_steps += 1
      bar.update(1)
      is_eval = bool(eval_fn and loop.eval_every and (i % loop.eval_every == 0
                                                      or i == loop.num_steps))
      saving = self.checkpointer is not None and (
          i == loop.num_steps or (loop.checkpoint_every > 0 and i % loop.checkpoint_every == 0))
      if saving and not (i % loop.log_every == 0 or i == start + 1 or is_eval):
        # Never save a state whose step was not finite: its loss and gradient norm are two
        # scalars to fetch, and a NaN state would replace good checkpoints in the rotation.
        check_finite(i, {k: float(v) for k, v in jax.device_get(metrics).items()
                         if k in FINITE_KEYS})
      if i % loop.log_every == 0 or i == loop.num_steps or i == start + 1 or is_eval:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(i, metrics)
        elapsed = time.perf_counter() - window_start
        if tokens_per_batch and i > start + 1:  # the first step includes compilation
          metrics["tokens_per_s"] = tokens_per_batch * window_steps / max(elapsed, 1e-9)
        if is_eval:
          metrics.update(eval_fn(state))
        self.writer.write(i, metrics)
        if "loss" in metrics:
          bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in (log_keys or sorted(metrics))
                         if k in metrics)
        logging.info("[%s] step %d/%d (%.0fs) %s", self.stage, i, loop.num_steps,
                     time.perf_counter() - t0, shown)
        last = metrics
        window_start, window_steps = time.perf_counter(), 0
      if saving:
        if not bool(_all_finite(state.params)):  # one scalar; a save writes them all anyway
          raise FloatingPointError(
              f"step {i}: the parameters are not finite; not saving them over good "
              "checkpoints. Lower the stage's optim.learning_rate or set optim.grad_clip.")
        self.checkpointer.maybe_save(
            i, state, {"data_position": batches.position, "step": i, "carry": dict(carry),
                       "metrics": _json_safe(last) if last else {}},
            force=i == loop.num_steps)
    bar.close()
    if start >= loop.num_steps:  # resumed a finished run: report what it last logged
      last = dict(self.restored_metrics)
      if eval_fn:
        last.update(eval_fn(state))
    return state, last

  def close(self):
    if self.checkpointer is not None:
      self.checkpointer.close()
    self.writer.close()
