"""The gold-reward lab: `python -m rlhf_jax.lab --config=configs/lab.py[:test]`. The run's
config (`configs/ppo.py` with the same preset: SFT, pairs, RM and PPO settings) plus a `lab`
section; see rlhf_jax/lab/__main__.py."""

import ml_collections

from rlhf_jax import config as config_lib


def get_config(preset: str = ""):
  c = config_lib.get_config("ppo", preset)
  c.unlock()
  c.lab = ml_collections.ConfigDict(dict(
      proxy_pairs=(250, 1000, 4000),  # training pairs of each proxy RM (nested subsets)
      ensemble_size=3, ensemble_pairs=1000,  # members: own draw of pairs, own seed; 0: none
      objectives=("mean", "worst_case", "uncertainty_weighted"),
      uncertainty_lambda=0.5,  # mean - lambda * std
      bon=dict(n=(1, 2, 4, 8, 16, 32, 64, 128, 256), num_prompts=64,
               batch_size=2),  # prompts per sampling call: batch_size * max(n) rows
      # PPO against each proxy and each of `objectives` of the ensemble (the ppo section's
      # settings), driven further than the default, with a held-out eval/* point every
      # eval_every iterations; num_iterations 0: no RL.
      rl=dict(num_iterations=120, eval_every=10,
              objectives=("mean", "worst_case", "uncertainty_weighted")),
  ))
  c.ppo.data.num_eval_prompts = 128
  c.rm.data.num_train_prompts = 8192  # ~4000 kept pairs (ties and duplicates are dropped)
  if preset == "test":
    c.lab.update(proxy_pairs=(16, 32, 64), ensemble_size=2, ensemble_pairs=32)
    c.lab.bon.update(n=(1, 2, 4, 8), num_prompts=16, batch_size=4)
    c.lab.rl.update(num_iterations=4, eval_every=2, objectives=("worst_case",))
    c.rm.data.num_train_prompts = 256
  c.lock()
  return c
