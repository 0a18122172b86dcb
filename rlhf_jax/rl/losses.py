"""Policy and value losses, registered by name (`ppo.policy_loss`, `ppo.value_loss`).

A policy loss is `(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp) -> (loss, metrics)`;
a value loss `(values_BxN, old_values_BxN, returns_BxN, mask_BxN, hp) -> (loss, metrics)`,
with `hp` the scalar hyper-parameters (`core.RLParams`). Checked against numpy in
tests/rl_test.py.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.registry import Registry
from rlhf_jax.rl.core import masked_mean

POLICY_LOSSES = Registry("ppo.policy_loss")
VALUE_LOSSES = Registry("ppo.value_loss")


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp):
  return policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp.clip_ratio)


@VALUE_LOSSES.register("clipped")
def clipped_value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, hp):
  return value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, hp.value_clip)


def policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, clip: float):
  """Clipped surrogate; returns (loss, metrics)."""
  log_ratio = logp_BxN - old_logp_BxN
  ratio = jnp.exp(log_ratio)
  pg1 = -advantages_BxN * ratio
  pg2 = -advantages_BxN * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(pg1, pg2), mask_BxN)
  return loss, {
      "policy/clipfrac": masked_mean((pg2 > pg1).astype(jnp.float32), mask_BxN),
      "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask_BxN),
      "val/ratio": masked_mean(ratio, mask_BxN),
  }

def value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, clip: float):
  """0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2), masked mean; (loss, metrics)."""
  # clip(V, V_old - c, V_old + c), not V_old + clip(V - V_old): the latter is not exactly V
  # when unclipped, which would count rounding as clipping in val/clipfrac.
  clipped = jnp.clip(values_BxN, old_values_BxN - clip, old_values_BxN + clip)
  l1 = (values_BxN - returns_BxN) ** 2
  l2 = (clipped - returns_BxN) ** 2
  loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask_BxN)
  return loss, {"val/clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask_BxN)}
