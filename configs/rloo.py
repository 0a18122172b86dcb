"""RLOO (Ahmadian et al. 2024): SFT -> preferences -> RM -> RLOO, k=4 samples per prompt,
leave-one-out baseline, KL folded into the sequence reward. `--config=configs/rloo.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("rloo", preset)
