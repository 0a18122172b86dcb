"""The math of PPO for RLHF, as small pure functions (no models, no loops).

Shapes: B sequences, N response tokens. `mask_BxN` is 1 on response tokens (up to and
including EOS) and 0 on the pads after them. Everything here is jit-able and is checked
against plain numpy in tests/ppo_core_test.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
  mask = mask.astype(x.dtype)
  return (x * mask).sum(axis=axis) / jnp.maximum(mask.sum(axis=axis), 1.0)


def masked_whiten(x, mask, shift_mean: bool = True):
  """(x - mean) / std over the valid tokens (pads stay 0); shift_mean=False keeps the mean."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return out * mask


def token_logprobs(logits_BxNxV, tokens_BxN, temperature: float = 1.0):
  """log pi(token) under softmax(logits / temperature), the sampling distribution."""
  logits_BxNxV = logits_BxNxV.astype(jnp.float32)  # divide in float32, not bfloat16
  if temperature > 0:
    logits_BxNxV = logits_BxNxV / temperature
  # logit[token] - logsumexp: a full log_softmax would write (and differentiate) a
  # [B, N, V] array only to read N values of it.
  picked_BxN = jnp.take_along_axis(logits_BxNxV, tokens_BxN[..., None], axis=-1)[..., 0]
  return picked_BxN - jax.nn.logsumexp(logits_BxNxV, axis=-1)


def token_entropy(logits_BxNxV, temperature: float = 1.0):
  logits_BxNxV = logits_BxNxV.astype(jnp.float32)
  if temperature > 0:
    logits_BxNxV = logits_BxNxV / temperature
  logp = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)


def kl_per_token(logp_BxN, ref_logp_BxN, kind: str = "k1"):
  """Estimates of KL(pi || pi_ref) from samples of pi (Schulman's k1 and k3).

  k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
  r = pi_ref / pi (unbiased, always >= 0, lower variance).
  """
  log_ratio = logp_BxN - ref_logp_BxN
  if kind == "k1":
    return log_ratio
  if kind == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"ppo.kl_estimator is {kind!r}; choose 'k1' or 'k3'.")


def last_index(mask_BxN):
  """Index of the last valid token of each row (0 for an all-pad row)."""
  n = mask_BxN.shape[-1]
  has_any = mask_BxN.any(axis=-1)
  idx = n - 1 - jnp.argmax(mask_BxN[:, ::-1].astype(jnp.int32), axis=-1)
  return jnp.where(has_any, idx, 0)


def rlhf_rewards(kl_BxN, scores_B, mask_BxN, beta):
  """Per-token reward: -beta * KL_t on every response token, plus the score on the last."""
  mask = mask_BxN.astype(jnp.float32)
  non_score_BxN = -beta * kl_BxN * mask
  at_end_BxN = jax.nn.one_hot(last_index(mask_BxN), mask.shape[-1]) * mask
  return non_score_BxN + scores_B[:, None] * at_end_BxN, non_score_BxN


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


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
  """Ziegler et al.'s controller: e = clip(KL/target - 1, +-0.2); beta *= 1 + e * n / horizon."""
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return beta * (1.0 + error * n_steps / horizon)
