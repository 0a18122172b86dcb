"""Supervised fine-tuning. `--config=configs/sft.py` or `--config=configs/sft.py:test`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("sft", preset)
