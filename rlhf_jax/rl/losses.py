"""Policy, value and preference losses, registered by name (`ppo.policy_loss`,
`ppo.value_loss`, `dpo.loss_type`).

A policy loss is `(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp, ref_logp_BxN=None)
-> (loss, metrics)`; a value loss `(values_BxN, old_values_BxN, returns_BxN, mask_BxN, hp) ->
(loss, metrics)`, with `hp` the hyper-parameters (`core.RLParams`).

    clipped   PPO's clipped surrogate, token mean (Schulman et al. 2017)
    grpo      the clipped surrogate with the range [1 - clip_low, 1 + clip_high] (DAPO's
              clip-higher), plus kl_loss_coef * KL(pi || pi_ref) per token (the
              `kl_loss_estimator`), aggregated by `loss_aggregation`: token_mean (DAPO),
              sequence_mean (GRPO: mean over a sequence's tokens, then over sequences) or
              fixed_length (Dr. GRPO: sum over tokens / (B * N), no length bias)

Preference losses (DPO family) take summed sequence log-probs of the policy and of the
frozen reference for chosen and rejected; see `preference_loss`. Checked against numpy in
tests/rl_test.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.registry import Registry
from rlhf_jax.rl.core import KL_ESTIMATORS, masked_mean

POLICY_LOSSES = Registry("ppo.policy_loss")
VALUE_LOSSES = Registry("ppo.value_loss")


PREFERENCE_LOSSES = Registry("dpo.loss_type")
AGGREGATIONS = ("token_mean", "sequence_mean", "fixed_length")


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp,
                        ref_logp_BxN=None):
  del ref_logp_BxN  # PPO's KL is in the reward
  return policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp.clip_ratio)


def aggregate(loss_BxN, mask_BxN, mode: str):
  """A per-token loss reduced to a scalar (see the module docstring)."""
  mask = mask_BxN.astype(jnp.float32)
  if mode == "token_mean":
    return masked_mean(loss_BxN, mask)
  if mode == "sequence_mean":
    return (masked_mean(loss_BxN, mask, axis=1)).mean()
  if mode == "fixed_length":
    return (loss_BxN * mask).sum() / mask.size
  raise ValueError(f"loss_aggregation is {mode!r}; choose one of {AGGREGATIONS}.")


@POLICY_LOSSES.register("grpo")
def grpo_policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, hp,
                     ref_logp_BxN=None):
  low = hp.clip_low or hp.clip_ratio
  high = hp.clip_high or hp.clip_ratio
  log_ratio = logp_BxN - old_logp_BxN
  ratio = jnp.exp(log_ratio)
  pg1 = -advantages_BxN * ratio
  pg2 = -advantages_BxN * jnp.clip(ratio, 1.0 - low, 1.0 + high)
  per_token = jnp.maximum(pg1, pg2)
  metrics = {"policy/clipfrac": masked_mean((pg2 > pg1).astype(jnp.float32), mask_BxN),
             "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask_BxN),
             "val/ratio": masked_mean(ratio, mask_BxN)}
  if hp.kl_loss_coef:
    kl = KL_ESTIMATORS.get(hp.kl_loss_estimator)(logp_BxN - ref_logp_BxN)
    per_token = per_token + hp.kl_loss_coef * kl
    metrics["objective/kl_loss"] = masked_mean(kl, mask_BxN)
  return aggregate(per_token, mask_BxN, hp.loss_aggregation), metrics


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


@PREFERENCE_LOSSES.register("dpo")
def dpo_loss(logits_B, beta: float, label_smoothing: float = 0.0):
  """-log sigmoid(beta * logits); with label smoothing eps (cDPO) the labels are flipped with
  probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits_B)
          - label_smoothing * jax.nn.log_sigmoid(-beta * logits_B))


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(logits_B, beta: float, label_smoothing: float = 0.0):
  """(h - 1 / (2 beta))^2 (Azar et al.), h the log-ratio difference (no label smoothing)."""
  del label_smoothing
  return (logits_B - 1.0 / (2.0 * beta)) ** 2


def preference_loss(chosen_logp_B, rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B,
                    beta: float, loss_type: str = "dpo", label_smoothing: float = 0.0):
  """(mean loss, TRL's metrics) from summed sequence log-probs of policy and reference.

  h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)); the implicit rewards are
  beta * (log pi - log ref) of chosen and rejected.
  """
  chosen_ratio = chosen_logp_B - ref_chosen_logp_B
  rejected_ratio = rejected_logp_B - ref_rejected_logp_B
  h = chosen_ratio - rejected_ratio
  loss = PREFERENCE_LOSSES.get(loss_type)(h, beta, label_smoothing).mean()
  chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
  return loss, {"rewards/chosen": chosen_reward.mean(),
                "rewards/rejected": rejected_reward.mean(),
                "rewards/accuracies": (chosen_reward > rejected_reward).mean(),
                "rewards/margins": (chosen_reward - rejected_reward).mean(),
                "logps/chosen": chosen_logp_B.mean(), "logps/rejected": rejected_logp_B.mean()}
