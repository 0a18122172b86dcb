"""The full pipeline: SFT -> preference generation -> RM -> PPO. `--config=configs/ppo.py[:test]`.

Each stage reuses a finished run in the workdir and resumes an interrupted one;
`--config.sft_checkpoint=W/sft --config.rm_checkpoint=W/rm` runs PPO only.
"""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("ppo", preset)
