"""Advantage estimators, registered by name (`ppo.advantage_estimator`).

An estimator is a pure function `(episodes, hp) -> (advantages_BxN, returns_BxN)`:
`episodes` holds the per-token rewards, critic values and response mask of a batch (later
estimators add what they need, e.g. group ids for group baselines), `hp` the
hyper-parameters (`core.RLParams`). Checked against numpy loops in tests/rl_test.py.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.registry import Registry
from rlhf_jax.rl.core import RLParams

ADVANTAGE_ESTIMATORS = Registry("ppo.advantage_estimator")


@flax.struct.dataclass
class Episodes:
  rewards_BxN: jax.Array  # per-token reward (KL penalty + score at the last token)
  values_BxN: jax.Array  # critic values at the response positions
  mask_BxN: jax.Array  # 1 on response tokens up to and including EOS


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
