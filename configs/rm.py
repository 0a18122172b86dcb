"""Reward model (builds or reuses the SFT policy first). `--config=configs/rm.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("rm", preset)
