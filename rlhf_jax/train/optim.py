"""AdamW with warm-up + cosine decay and global-norm clipping, from an `optim` config."""

from __future__ import annotations

from typing import Any, Mapping

import optax

from rlhf_jax.keys import check_known_keys

_KEYS = {"learning_rate", "warmup_steps", "decay_steps", "end_lr_ratio", "weight_decay", "b1",
         "b2", "eps", "grad_clip", "schedule", "grad_accum_steps"}


def make_schedule(cfg: Mapping[str, Any]):
  """Learning rate as a function of the step. `schedule`: "cosine" or "linear" (warm-up
  from 0, then decay to `end_lr_ratio` * lr at `decay_steps`), or "constant" (after warm-up)."""
  lr = float(cfg["learning_rate"])
  warmup = int(cfg.get("warmup_steps", 0))
  schedule = cfg.get("schedule", "cosine")
  if schedule == "constant":
    return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  if schedule not in ("cosine", "linear"):
    raise ValueError(f"optim.schedule is {schedule!r}; choose 'cosine', 'linear' or 'constant'.")
  decay = int(cfg["decay_steps"])
  if decay <= warmup:
    raise ValueError(f"optim config: decay_steps ({decay}) must exceed warmup_steps ({warmup}).")
  end = lr * float(cfg.get("end_lr_ratio", 0.1))
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, end_value=end)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                               optax.linear_schedule(lr, end, decay - warmup)], [warmup])


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """AdamW on `make_schedule(cfg)`, after global-norm clipping if `grad_clip` > 0."""
  check_known_keys("optim", cfg, _KEYS)
  chain = []
  if cfg.get("grad_clip"):
    chain.append(optax.clip_by_global_norm(float(cfg["grad_clip"])))
  chain.append(optax.adamw(make_schedule(cfg), b1=float(cfg.get("b1", 0.9)),
                           b2=float(cfg.get("b2", 0.95)), eps=float(cfg.get("eps", 1e-8)),
                           weight_decay=float(cfg.get("weight_decay", 0.0))))
  return optax.chain(*chain)
