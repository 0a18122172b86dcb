"""The gold-reward lab: `python -m rlhf_jax.lab --config=configs/lab.py[:PRESET]`. The run's
config (`configs/ppo.py`'s sections: SFT, pairs, RM and PPO settings) plus a `lab` section;
see rlhf_jax/lab/__main__.py.

Presets: "" (the 2-core CPU default, 16.5 min), "test" (seconds), and the scale presets
(`125m`, `1b-8gpu`, ...: their networks and meshes, with more prompts, pairs and iterations
for an accelerator).

Why the default runs the `sort` task, not `sentiment` (measured, README "The gold-reward
lab"): on sentiment the gold reward (VADER) is as easy to game as the proxies are — PPO
against every proxy, even one of 250 pairs at 54% accuracy, drove the policy to "I love ...
love" and gold kept rising (to +0.6-0.75 over 110 iterations at kl_coef 0.01). Sorting has
a gold reward no surface feature satisfies (the digits must be the prompt's, in order), so a
proxy that learnt "ascending, repeated digits" is exploitable: against 250 pairs gold peaks
at KL 6.6 (iteration 30) and falls to the SFT policy's by iteration 100 while the proxy
keeps rising. SFT is stopped early (60 steps, held-out gold 0.075 of 1) so the samples
disagree, the pairs carry signal (84% of prompts give a non-tied pair) and there is room
above the SFT policy. kl_coef 0.02 takes PPO to KL 5-12 nats in 100 iterations.
"""

import ml_collections

from rlhf_jax import config as config_lib
from rlhf_jax import scale


def _sort_task(c) -> None:
  c.tokenizer.kind = "byte"  # digits and spaces: nothing to learn
  c.data.update(task="sort", max_prompt_len=24, max_completion_len=16)
  c.sft.optim.decay_steps = 60
  c.sft.train.update(num_steps=60, eval_every=30, checkpoint_every=30)


def get_config(preset: str = ""):
  c = config_lib.get_config("ppo", preset)
  c.unlock()
  c.lab = ml_collections.ConfigDict(dict(
      proxy_pairs=(250, 1000, 4000),  # training pairs of each proxy RM (nested subsets)
      ensemble_size=3, ensemble_pairs=1000,  # members: own draw of pairs, own seed; 0: none
      objectives=("mean", "worst_case", "uncertainty_weighted"),  # best-of-N rankings
      uncertainty_lambda=0.5,  # mean - lambda * std
      bon=dict(n=(1, 2, 4, 8, 16, 32, 64, 128, 256), num_prompts=128,
               batch_size=2),  # prompts per sampling call: batch_size * max(n) rows
      # PPO against each proxy and each of `objectives` of the ensemble (the ppo section's
      # settings), driven further than the default, with a held-out eval/* point every
      # eval_every iterations; num_iterations 0: no RL.
      rl=dict(num_iterations=100, eval_every=10,
              objectives=("mean", "worst_case", "uncertainty_weighted")),
  ))
  c.ppo.data.num_eval_prompts = 256  # each RL evaluation's gold SE ~0.02
  c.rm.data.num_train_prompts = 8192  # ~6900 kept pairs (ties and identical ones dropped)
  if preset == "":
    _sort_task(c)
    c.ppo.kl_coef = 0.02
  elif preset == "test":
    c.lab.update(proxy_pairs=(16, 32, 64), ensemble_size=2, ensemble_pairs=32)
    c.lab.bon.update(n=(1, 2, 4, 8), num_prompts=16, batch_size=4)
    c.lab.rl.update(num_iterations=4, eval_every=2, objectives=("worst_case",))
    c.rm.data.num_train_prompts = 256
  elif scale.is_scale_preset(preset):  # not run yet: no accelerator was at hand
    # The preset's shapes and mesh on the sort task's short sequences. SFT keeps the CPU
    # default's early stop (60 steps): check its held-out gold (~0.1 of 1 wanted) in
    # sft/summary.json and move sft.train.num_steps if the network learns faster or slower.
    _sort_task(c)
    c.data.update(max_prompt_len=24, max_completion_len=16)
    c.sft.optim.warmup_steps = 10  # the preset's 50 would leave no step at full rate
    c.ppo.kl_coef = 0.02
    c.lab.update(proxy_pairs=(250, 1000, 4000, 16000), ensemble_size=4, ensemble_pairs=4000)
    c.lab.bon.update(n=tuple(2 ** k for k in range(11)), num_prompts=256, batch_size=1)
    c.lab.rl.update(num_iterations=300, eval_every=10)
    c.ppo.data.num_eval_prompts = 512
    c.rm.data.num_train_prompts = 40000
  c.lock()
  return c
