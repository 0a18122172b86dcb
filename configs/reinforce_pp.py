"""REINFORCE++ (Hu 2025): SFT -> preferences -> RM -> REINFORCE++, token-level KL penalty in
the reward, no critic, returns whitened over the global batch.
`--config=configs/reinforce_pp.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("reinforce_pp", preset)
