"""DPO / IPO / cDPO (Rafailov et al. 2023; Azar et al. 2023): SFT -> preference pairs ->
DPO against the frozen SFT policy (the RM is trained only to report its score;
`--config.dpo.reward=none` skips it). `--config=configs/dpo.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("dpo", preset)
