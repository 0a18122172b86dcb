"""GRPO (Shao et al. 2024): SFT -> preferences -> RM -> GRPO, G=4 samples per prompt,
group-normalised advantages, KL to the reference as a loss term.
`--config=configs/grpo.py[:test]`. RLOO and REINFORCE++ have their own configs."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("grpo", preset)
