"""The held-out summary every policy-optimisation stage reports: gold reward (bundled tasks)
and RM score of the start policy vs the trained one, on the same held-out prompts and keys.

The RM scores the sampled ids in the rollout layout (prompt + response), as in training; the
gold reward reads the decoded texts.
"""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import artifacts, sampling


def held_out_summary(config, stage: str, policy: artifacts.Policy, trained_params, reward,
                     sampler, score_fn, prompts, mesh, batch_size: int) -> dict[str, float]:
  """`final/{sft,<stage>}_{gold_reward,rm_score}`. `sampler`: one sample per prompt;
  `score_fn`: the jitted normalised RM score (None without an RM)."""
  d = config.data
  out = {}
  for name, params in (("sft", policy.params), (stage, trained_params)):
    samples = sampling.sample_prompts(sampler, params, policy.tokenizer, prompts.eval, mesh,
                                      d.max_prompt_len, batch_size,
                                      jax.random.PRNGKey(config.seed + 7))
    if reward is not None:
      scores = artifacts.sequence_scores(score_fn, reward.params, samples.seq,
                                         samples.seq_mask, batch_size, mesh)
      out[f"final/{name}_rm_score"] = float(np.mean(scores, dtype=np.float64))
    if prompts.task is not None:
      out[f"final/{name}_gold_reward"] = float(np.mean(
          [prompts.task.gold_reward(q, a) for q, a in zip(prompts.eval, samples.texts)]))
  return out
