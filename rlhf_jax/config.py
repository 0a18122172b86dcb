"""Default configs of every stage, as ml_collections ConfigDicts.

The files in `configs/` are thin wrappers so that `--config=configs/sft.py:preset` works
from the command line; every key can be overridden, e.g. `--config.optim.learning_rate=1e-3`
or `--config.mesh.tensor=2`. Keys are locked: a misspelt override is an error.
"""

from __future__ import annotations

import ml_collections

from rlhf_jax.models.config import TransformerConfig


def model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = TransformerConfig().to_dict()
  cfg.pop("vocab_size")  # Set by the tokenizer.
  cfg.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=344)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def mesh_config() -> ml_collections.ConfigDict:
  # data=-1: plain data parallelism over every device; see rlhf_jax/sharding.py.
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))


def sft_config(preset: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"
  c.seed = 0
  c.model = model_config()
  c.mesh = mesh_config()
  c.data = ml_collections.ConfigDict(dict(
      task="sort", num_train=4096, num_eval=256, batch_size=32, max_prompt_len=24,
      max_completion_len=16))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=20, decay_steps=300, end_lr_ratio=0.1,
      weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, schedule="cosine"))
  c.train = ml_collections.ConfigDict(dict(num_steps=300, log_every=25, eval_every=100))
  if preset == "test":  # Seconds on one CPU core: for tests and smoke runs.
    c.model = model_config(d_model=64, mlp_dim=172)
    c.data.update(num_train=256, num_eval=64, batch_size=16)
    c.optim.update(warmup_steps=2, decay_steps=30)
    c.train.update(num_steps=30, log_every=10, eval_every=30)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/sft.py; presets: '', 'test'.")
  c.lock()
  return c
