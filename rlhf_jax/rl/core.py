"""The shared math of RL for language models, as small pure functions (no models, no loops):
masked statistics, log-probs and entropy under the sampling temperature, KL estimators (a
registry), the per-token RLHF reward and the adaptive KL controller. Advantage estimators
are in `advantages.py`, policy and value losses in `losses.py`.

Shapes: B sequences, N response tokens. `mask_BxN` is 1 on response tokens (up to and
including EOS) and 0 on the pads after them. Everything here is jit-able and is checked
against plain numpy in tests/rl_test.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.registry import Registry

KL_ESTIMATORS = Registry("ppo.kl_estimator")


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


@KL_ESTIMATORS.register("k1")
def kl_k1(log_ratio_BxN):
  """k1 = log pi - log pi_ref: unbiased, can be negative."""
  return log_ratio_BxN


@KL_ESTIMATORS.register("k2")
def kl_k2(log_ratio_BxN):
  """k2 = (log pi - log pi_ref)^2 / 2: biased, >= 0; its gradient is that of the reverse KL
  (the choice GRPO's KL term needs for an unbiased gradient, TRL issue 4967)."""
  return 0.5 * log_ratio_BxN ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_ratio_BxN):
  """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, always >= 0, lower variance."""
  return jnp.expm1(-log_ratio_BxN) + log_ratio_BxN


def token_kl_exact(logits_BxNxV, ref_logits_BxNxV, temperature: float = 1.0):
  """KL(pi(.|prefix) || pi_ref(.|prefix)) at each position, summed over the whole vocabulary
  (both at the sampling temperature). Summed over a response sampled from pi, its mean is
  the sequence KL (chain rule) with far less variance than k1 / k3 of the sampled tokens:
  no single token whose probability pi moved far from the reference's dominates it."""
  def log_softmax(logits):
    logits = logits.astype(jnp.float32)
    return jax.nn.log_softmax(logits / temperature if temperature > 0 else logits, axis=-1)
  logp, ref_logp = log_softmax(logits_BxNxV), log_softmax(ref_logits_BxNxV)
  return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)


def kl_per_token(logp_BxN, ref_logp_BxN, kind: str = "k1"):
  """Estimates of KL(pi || pi_ref) from samples of pi (Schulman's k1 and k3), per token."""
  return KL_ESTIMATORS.get(kind)(logp_BxN - ref_logp_BxN)

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





def best_of_n_kl(n: int) -> float:
  """The KL of best-of-N sampling to the base policy, log N - (N - 1) / N (Stiennon et al.;
  exact for continuous rewards without ties)."""
  return float(jnp.log(n) - (n - 1) / n)


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
  """Ziegler et al.'s controller: e = clip(KL/target - 1, +-0.2); beta *= 1 + e * n / horizon."""
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return beta * (1.0 + error * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class RLParams:
  """The hyper-parameters the RL math reads: scalars and registry names, no arrays. Frozen
  and hashable, so jitted functions close over it instead of over a whole config."""
  gamma: float = 1.0
  lam: float = 0.95
  clip_ratio: float = 0.2
  value_clip: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  temperature: float = 1.0  # the sampling temperature: log-probs are of softmax(logits / T)
  kl_estimator: str = "k1"
  advantage_estimator: str = "gae"
  policy_loss: str = "clipped"
  value_loss: str = "clipped"
  whiten_rewards: bool = False
  score_clip: float = 0.0  # 0: off
  missing_eos_penalty: float = 0.0
  # Critic-free estimators: samples of one prompt are `group_size` consecutive rows.
  group_size: int = 1
  scale_rewards: bool = True  # GRPO: divide by the group's std (False: Dr. GRPO)
  # The clipped loss's range is [1 - clip_low, 1 + clip_high] (0: clip_ratio); DAPO's
  # "clip-higher" sets clip_high > clip_low.
  clip_low: float = 0.0
  clip_high: float = 0.0
  kl_loss_coef: float = 0.0  # > 0: beta * KL(pi || pi_ref) as a loss term (GRPO)
  kl_loss_estimator: str = "k3"
  loss_aggregation: str = "token_mean"  # | "sequence_mean" | "fixed_length"

  @classmethod
  def from_config(cls, section, temperature: float) -> "RLParams":
    """From a stage's config section (e.g. `config.ppo`) and the sampling temperature."""
    values = {f.name: section[f.name] for f in dataclasses.fields(cls)
              if f.name != "temperature" and f.name in section}
    return cls(**values, temperature=float(temperature))
