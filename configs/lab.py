"""The gold-reward lab: `python -m rlhf_jax.lab --config=configs/lab.py[:test]`. The run's
config (`configs/rm.py` with the same preset: SFT, pairs, RM settings) plus a `lab` section;
see rlhf_jax/lab/__main__.py."""

import ml_collections

from rlhf_jax import config as config_lib


def get_config(preset: str = ""):
  c = config_lib.get_config("rm", preset)
  c.unlock()
  c.lab = ml_collections.ConfigDict(dict(
      proxy_pairs=(250, 1000, 4000),  # training pairs of each proxy RM (nested subsets)
      ensemble_size=3, ensemble_pairs=1000,  # members: own draw of pairs, own seed; 0: none
      objectives=("mean", "worst_case", "uncertainty_weighted"),
      uncertainty_lambda=0.5,  # mean - lambda * std
      bon=dict(n=(1, 2, 4, 8, 16, 32, 64, 128, 256), num_prompts=64,
               batch_size=2),  # prompts per sampling call: batch_size * max(n) rows
  ))
  c.rm.data.num_train_prompts = 8192  # ~4000 kept pairs (ties and duplicates are dropped)
  if preset == "test":
    c.lab.update(proxy_pairs=(16, 32, 64), ensemble_size=2, ensemble_pairs=32)
    c.lab.bon.update(n=(1, 2, 4, 8), num_prompts=16, batch_size=4)
    c.rm.data.num_train_prompts = 256
  c.lock()
  return c
