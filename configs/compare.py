"""The algorithm comparison: `python -m rlhf_jax.compare --config=configs/compare.py
[--workdir=DIR]` trains SFT and the RM once, then every algorithm from them with the same
budget of sampled responses, and writes a markdown + JSON table (`rlhf_jax/compare.py`)."""

import ml_collections


def get_config(preset: str = ""):
  c = ml_collections.ConfigDict()
  c.preset = preset  # applied to every algorithm's config, e.g. "test"
  c.algorithms = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo", "best_of_n")
  # Responses each online RL algorithm samples in training: its num_iterations is this over
  # its responses per iteration (64 for every default: PPO 64 prompts, GRPO / RLOO 16 x 4,
  # REINFORCE++ 64 x 1). DPO trains on the RM's pairs and best-of-N on none.
  c.num_responses = 2560 if preset != "test" else 192  # test: seconds per algorithm
  # Config overrides for every run, "key=value;key=value", e.g. "data.task=arithmetic".
  c.overrides = ""
  c.lock()
  return c
