"""Best-of-N: SFT -> preferences -> RM -> N samples per held-out prompt, the RM's best kept,
for every N of `best_of_n.n` (analytic KL log N - (N - 1) / N).
`--config=configs/best_of_n.py[:test]`."""

from rlhf_jax import config


def get_config(preset: str = ""):
  return config.get_config("best_of_n", preset)
