"""Critic-free RL: SFT -> preferences -> RM -> GRPO (or RLOO / REINFORCE++ with
`--config.grpo.advantage_estimator=rloo|reinforce_pp`). `--config=configs/grpo.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("grpo", preset)
