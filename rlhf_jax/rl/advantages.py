"""Advantage estimators, registered by name (`ppo.advantage_estimator`).

An estimator is a pure function `(episodes, hp) -> (advantages_BxN, returns_BxN)`:
`episodes` holds the per-token rewards, critic values, response mask and sequence scores of
a batch, `hp` the hyper-parameters (`core.RLParams`). Critic-free estimators read groups:
the samples of one prompt are `hp.group_size` consecutive rows.

    gae           GAE(gamma, lambda) on the critic's values (PPO)
    grpo          (r - mean_group) / (std_group + eps), or r - mean_group (Dr. GRPO:
                  scale_rewards=False), r the sequence score; on every response token
    rloo          r_i - mean of the other k - 1 rewards of its prompt, r the sequence reward
                  with the KL penalty folded in (sum of the per-token rewards)
    reinforce_pp  discounted return-to-go of the per-token rewards (KL penalty at every
                  token, score at the last), whitened over the whole batch's valid tokens

Returns of critic-free estimators are the advantages (nothing trains a value on them).
Checked against numpy loops in tests/rl_test.py.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.registry import Registry
from rlhf_jax.rl.core import RLParams, masked_whiten

GROUP_EPS = 1e-4  # GRPO's eps in (r - mean) / (std + eps), as TRL

ADVANTAGE_ESTIMATORS = Registry("ppo.advantage_estimator")


@flax.struct.dataclass
class Episodes:
  rewards_BxN: jax.Array  # per-token reward (KL penalty + score at the last token)
  values_BxN: jax.Array  # critic values at the response positions (zeros without a critic)
  mask_BxN: jax.Array  # 1 on response tokens up to and including EOS
  scores_B: jax.Array | None = None  # the sequence reward alone (no KL), for GRPO


@ADVANTAGE_ESTIMATORS.register("gae")
def gae_estimator(episodes: Episodes, hp: RLParams):
  """GAE(gamma, lambda) on the critic's values; returns = advantages + values."""
  return gae(episodes.rewards_BxN, episodes.values_BxN, episodes.mask_BxN, hp.gamma, hp.lam)


def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float):
  """Generalised advantage estimation, scanned backwards over the response.

      delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

  with V_{t+1} and A_{t+1} taken as 0 past the last valid token and A_t = 0 on pads.
  Returns (advantages, returns = advantages + values).
  """
  mask = mask_BxN.astype(jnp.float32)
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  next_values = jnp.concatenate([values_BxN[:, 1:], jnp.zeros_like(values_BxN[:, :1])], axis=1)
  deltas = rewards_BxN + gamma * next_values * next_mask - values_BxN

  def step(next_adv_B, xs):
    delta_B, next_mask_B, mask_B = xs
    adv_B = (delta_B + gamma * lam * next_adv_B * next_mask_B) * mask_B
    return adv_B, adv_B

  _, adv_NxB = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]),
                            (deltas.T, next_mask.T, mask.T), reverse=True)
  advantages = adv_NxB.T
  return advantages, (advantages + values_BxN) * mask


def _groups(x_B, group_size: int):
  b = x_B.shape[0]
  if b % group_size:
    raise ValueError(f"a batch of {b} sequences does not divide into groups of {group_size}.")
  return x_B.reshape(b // group_size, group_size)


def _on_tokens(adv_B, mask_BxN):
  adv_BxN = adv_B[:, None] * mask_BxN.astype(jnp.float32)
  return adv_BxN, adv_BxN


def group_std_is_zero(scores_B, group_size: int):
  """[B/G] True where every reward of a group is equal: its advantages are all 0 (TRL's
  `frac_reward_zero_std` is their mean)."""
  g = _groups(scores_B.astype(jnp.float32), group_size)
  return jnp.all(g == g[:, :1], axis=1)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_estimator(episodes: Episodes, hp: RLParams):
  """Group-relative advantage of the sequence score, the same on every response token."""
  g = _groups(episodes.scores_B.astype(jnp.float32), hp.group_size)
  centred = g - g.mean(axis=1, keepdims=True)
  if hp.scale_rewards:
    n = hp.group_size
    # Unbiased std (torch.std, as TRL); a group of one has no spread: advantage 0.
    std = jnp.sqrt((centred ** 2).sum(axis=1, keepdims=True) / max(n - 1, 1))
    centred = centred / (std + GROUP_EPS)
  return _on_tokens(centred.reshape(-1), episodes.mask_BxN)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_estimator(episodes: Episodes, hp: RLParams):
  """Leave-one-out baseline: r_i - mean_{j != i} r_j within a prompt's k samples, r the
  sequence reward with the KL penalty (sum of the per-token rewards). k = 1: advantage 0."""
  mask = episodes.mask_BxN.astype(jnp.float32)
  r = _groups((episodes.rewards_BxN * mask).sum(axis=1), hp.group_size)
  k = hp.group_size
  if k == 1:
    return _on_tokens(jnp.zeros(r.shape[0]), mask)
  others = (r.sum(axis=1, keepdims=True) - r) / (k - 1)
  return _on_tokens((r - others).reshape(-1), mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_estimator(episodes: Episodes, hp: RLParams):
  """REINFORCE++: return-to-go G_t = sum_{s >= t} gamma^(s - t) r_s of the per-token
  rewards, whitened over every valid token of the batch (the global batch baseline)."""
  mask = episodes.mask_BxN.astype(jnp.float32)
  rewards = episodes.rewards_BxN * mask

  def step(next_return_B, xs):
    reward_B, mask_B = xs
    ret_B = (reward_B + hp.gamma * next_return_B) * mask_B
    return ret_B, ret_B

  _, ret_NxB = jax.lax.scan(step, jnp.zeros_like(rewards[:, 0]), (rewards.T, mask.T),
                            reverse=True)
  adv = masked_whiten(ret_NxB.T, mask)
  return adv, adv
