"""The full pipeline, SFT -> RM -> PPO. `--config=configs/ppo.py[:test]`.

The RM and PPO stages are not built yet (issues 4 and 5); until they are, this config runs
the most complete stage that exists, SFT, so the main job already works end to end.
"""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.sft_config(preset)
