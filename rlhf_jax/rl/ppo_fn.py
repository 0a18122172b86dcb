"""PPO's two pure functions on networks: the experience pass (no gradients) and the loss.

Both are functions of parameters, arrays and an `RLParams` (scalars and registry names), so
jitted programs close over nothing else. They run the actor-critic at the response positions
through the same `ActorCritic.on_response` forward, so at the parameters that sampled a batch
the first minibatch's probability ratio is exactly 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import ActorCritic, moe
from rlhf_jax.models.heads import response_logits
from rlhf_jax.rl import core
from rlhf_jax.rl.advantages import ADVANTAGE_ESTIMATORS, Episodes
from rlhf_jax.rl.losses import POLICY_LOSSES, VALUE_LOSSES

# The arrays of one batch of experience that the update steps read.
EXP_KEYS = ("seq", "seq_mask", "response", "mask", "old_logp", "old_values", "advantages",
            "returns")


def shape_scores(scores_B, resp_BxN, mask_BxN, eos_id: int, hp: core.RLParams):
  """(scores after the missing-EOS penalty and clipping, has_eos [B])."""
  has_eos = ((resp_BxN == eos_id) & (mask_BxN > 0)).any(axis=1)
  if hp.missing_eos_penalty:
    scores_B = jnp.where(has_eos, scores_B, scores_B - hp.missing_eos_penalty)
  if hp.score_clip:
    scores_B = jnp.clip(scores_B, -hp.score_clip, hp.score_clip)
  return scores_B, has_eos


def experience(ac_graphdef, ref_graphdef, ac_params, ref_params, batch, scores_B, beta,
               hp: core.RLParams, eos_id: int):
  """(experience dict of `EXP_KEYS`, metrics) of sampled responses.

  `batch`: `seq`, `seq_mask` [B, P+N] (prompt + response), `response`, `mask` [B, N];
  `scores_B`: the reward of each response (RM or programmatic); `beta`: the KL coefficient.
  """
  ac = nnx.merge(ac_graphdef, ac_params)
  ref = nnx.merge(ref_graphdef, ref_params)
  seq, seq_mask, resp, mask = batch["seq"], batch["seq_mask"], batch["response"], batch["mask"]
  n = resp.shape[1]
  logits, values = ac.on_response(seq, seq_mask, n)  # the forward `loss` runs too
  logp = core.token_logprobs(logits, resp, hp.temperature) * mask
  entropy = core.token_entropy(logits, hp.temperature)
  ref_logp = core.token_logprobs(response_logits(ref, seq, seq_mask, n), resp,
                                 hp.temperature) * mask
  values = values * mask
  scores, has_eos = shape_scores(scores_B, resp, mask, eos_id, hp)
  kl = core.kl_per_token(logp, ref_logp, hp.kl_estimator) * mask
  rewards, non_score = core.rlhf_rewards(kl, scores, mask, beta)
  if hp.whiten_rewards:
    rewards = core.masked_whiten(rewards, mask, shift_mean=False)
  estimator = ADVANTAGE_ESTIMATORS.get(hp.advantage_estimator)
  advantages, returns = estimator(Episodes(rewards, values, mask, scores), hp)
  advantages = core.masked_whiten(advantages, mask)
  metrics = {
      "objective/kl": kl.sum(axis=1).mean(),
      "objective/entropy": (-logp).sum(axis=1).mean(),  # TRL's definition: sum of -log pi
      "objective/non_score_reward": non_score.sum(axis=1).mean(),
      "objective/scores": scores.mean(),
      "objective/rlhf_reward": (scores + non_score.sum(axis=1)).mean(),
      "val/num_eos_tokens": has_eos.sum(),
      "policy/entropy_rollout": core.masked_mean(entropy, mask),
      "response_length": mask.sum(axis=1).mean(),
  }
  exp = {"seq": seq, "seq_mask": seq_mask, "response": resp, "mask": mask, "old_logp": logp,
         "old_values": values, "advantages": advantages, "returns": returns}
  return exp, metrics


def loss(model: ActorCritic, batch, hp: core.RLParams):
  """(policy loss + vf_coef * value loss - entropy_coef * entropy + MoE aux, metrics)."""
  n = batch["response"].shape[1]
  mask = batch["mask"]
  logits, values = model.on_response(batch["seq"], batch["seq_mask"], n)
  logp = core.token_logprobs(logits, batch["response"], hp.temperature) * mask
  pg_loss, pg_metrics = POLICY_LOSSES.get(hp.policy_loss)(
      logp, batch["old_logp"], batch["advantages"], mask, hp)
  vf_loss, vf_metrics = VALUE_LOSSES.get(hp.value_loss)(
      values, batch["old_values"], batch["returns"], mask, hp)
  # Without an entropy bonus the entropy is only a metric: no backward pass through it.
  entropy_logits = logits if hp.entropy_coef else jax.lax.stop_gradient(logits)
  entropy = core.masked_mean(core.token_entropy(entropy_logits, hp.temperature), mask)
  total = pg_loss + hp.vf_coef * vf_loss - hp.entropy_coef * entropy
  # MoE trunks: load balancing + router z-loss of every network this forward ran (policy and
  # separate critic, or the shared trunk once); 0 and no metrics for dense models.
  aux, aux_metrics = moe.aux_loss(model)
  return total + aux, {"loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": entropy,
                       **pg_metrics, **vf_metrics, **aux_metrics}
