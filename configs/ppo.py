"""The full pipeline, SFT -> RM -> PPO. `--config=configs/ppo.py[:test]`.

The PPO stage is not built yet (issue 5); until it is, this config runs the most complete
stage that exists, the reward model, which first trains (or reuses) the SFT policy in the
same workdir: SFT -> preference generation -> RM.
"""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.rm_config(preset)
