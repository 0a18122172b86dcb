"""Critic-free policy optimisation on groups of samples: GRPO (Shao et al. 2024), and with
another estimator RLOO (Ahmadian et al. 2024) or REINFORCE++ (Hu 2025).

One iteration (`Iteration.__call__`):
  1. rollout     `data.batch_size` prompts, `num_generations` (G) samples each: the prompts
                 are prefilled once and their KV cache repeated (`SamplingConfig.num_samples`)
  2. score       the normalised RM score of prompt + response ids, or the task's gold reward
  3. experience  no gradients: log-probs of the policy and of the frozen reference; per-token
                 reward -kl_coef * KL_t plus the score at the last token (RLOO, REINFORCE++);
                 advantages by `advantage_estimator` on the groups (`rl/advantages.py`);
                 `frac_reward_zero_std`: the groups whose rewards are all equal (advantage 0)
  4. update      ppo_epochs (GRPO's mu) x num_minibatches steps of `policy_loss` (`grpo`: the
                 clipped ratio against the sampling policy, + kl_loss_coef * KL to the
                 reference, aggregated by `loss_aggregation`); no critic
The `grpo`, `rloo` and `reinforce_pp` stages all run here, each reading its own section
(`config[stage]`, the defaults of its paper) and the shared sections.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import artifacts, evaluation, sampling, sharding
from rlhf_jax.models import PolicyModel, lora, moe
from rlhf_jax.models.heads import response_logits
from rlhf_jax.rl import core
from rlhf_jax.rl.advantages import ADVANTAGE_ESTIMATORS, Episodes, group_std_is_zero
from rlhf_jax.rl.losses import POLICY_LOSSES
from rlhf_jax.train import metrics as metrics_lib, optim, runner as runner_lib, state as state_lib

EXP_KEYS = ("seq", "seq_mask", "response", "mask", "old_logp", "ref_logp", "advantages")
LOG_KEYS = ("objective/scores", "objective/kl", "gold/reward", "loss", "policy/clipfrac",
            "frac_reward_zero_std")


def rl_params(section, temperature: float) -> core.RLParams:
  return dataclasses.replace(core.RLParams.from_config(section, temperature),
                             group_size=int(section.num_generations))


def experience(policy_graphdef, params, ref_params, batch, scores_B, hp: core.RLParams,
               eos_id: int, kl_coef: float):
  """(experience of `EXP_KEYS`, metrics) of B * G sampled responses, groups consecutive."""
  policy = nnx.merge(policy_graphdef, params)
  ref = nnx.merge(policy_graphdef, ref_params)
  seq, seq_mask, resp, mask = batch["seq"], batch["seq_mask"], batch["response"], batch["mask"]
  n = resp.shape[1]
  logp = core.token_logprobs(response_logits(policy, seq, seq_mask, n), resp,
                             hp.temperature) * mask
  ref_logp = core.token_logprobs(response_logits(ref, seq, seq_mask, n), resp,
                                 hp.temperature) * mask
  has_eos = ((resp == eos_id) & (mask > 0)).any(axis=1)
  if hp.missing_eos_penalty:
    scores_B = jnp.where(has_eos, scores_B, scores_B - hp.missing_eos_penalty)
  if hp.score_clip:
    scores_B = jnp.clip(scores_B, -hp.score_clip, hp.score_clip)
  kl = core.kl_per_token(logp, ref_logp, hp.kl_estimator) * mask
  rewards, non_score = core.rlhf_rewards(kl, scores_B, mask, kl_coef)
  estimator = ADVANTAGE_ESTIMATORS.get(hp.advantage_estimator)
  advantages, _ = estimator(Episodes(rewards, jnp.zeros_like(rewards), mask, scores_B), hp)
  metrics = {"objective/kl": kl.sum(axis=1).mean(), "objective/scores": scores_B.mean(),
             "objective/non_score_reward": non_score.sum(axis=1).mean(),
             "frac_reward_zero_std": group_std_is_zero(scores_B, hp.group_size).mean(),
             "val/num_eos_tokens": has_eos.sum(), "response_length": mask.sum(axis=1).mean()}
  return {"seq": seq, "seq_mask": seq_mask, "response": resp, "mask": mask, "old_logp": logp,
          "ref_logp": ref_logp, "advantages": advantages}, metrics


def loss(policy: PolicyModel, batch, hp: core.RLParams):
  """(registered policy loss - entropy_coef * entropy + MoE aux, metrics)."""
  mask = batch["mask"]
  logits = response_logits(policy, batch["seq"], batch["seq_mask"], batch["response"].shape[1])
  logp = core.token_logprobs(logits, batch["response"], hp.temperature) * mask
  pg_loss, metrics = POLICY_LOSSES.get(hp.policy_loss)(
      logp, batch["old_logp"], batch["advantages"], mask, hp, batch["ref_logp"])
  entropy_logits = logits if hp.entropy_coef else jax.lax.stop_gradient(logits)
  entropy = core.masked_mean(core.token_entropy(entropy_logits, hp.temperature), mask)
  aux, aux_metrics = moe.aux_loss(policy)
  return pg_loss - hp.entropy_coef * entropy + aux, {
      "loss/policy": pg_loss, "policy/entropy": entropy, **metrics, **aux_metrics}


@dataclasses.dataclass
class Programs:
  sampler: Callable  # G samples per prompt
  eval_sampler: Callable  # one sample per prompt (the held-out summary)
  score: Callable | None
  experience: Callable
  train_step: Any  # train.state.TrainStep

  def compiled(self) -> dict[str, int]:
    fns = {"sampler": self.sampler, "score": self.score, "experience": self.experience,
           "train_step": self.train_step.jitted}
    return {k: f._cache_size() for k, f in fns.items() if f is not None}


class Iteration:
  """One iteration as `(state, ref_params, prompts, it) -> (state, metrics, texts)`."""

  def __init__(self, config, mesh, policy: artifacts.Policy, reward, tx, shardings,
               gold_fn: Callable | None = None, stage: str = "grpo"):
    g = config[stage]
    self.config, self.mesh, self.reward, self.gold_fn = config, mesh, reward, gold_fn
    self.section = g
    self.tok = policy.tokenizer
    self.hp = hp = rl_params(g, config.sampling.temperature)
    base = sampling.from_config(config.sampling, config.data.max_completion_len)
    eos_id, kl_coef, graphdef = self.tok.eos_id, float(g.kl_coef), policy.graphdef
    exp_fn = jax.jit(lambda p, r, b, s: experience(graphdef, p, r, b, s, hp, eos_id, kl_coef))
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in EXP_KEYS}
    self.programs = Programs(
        sampling.make_sampler(graphdef, dataclasses.replace(base, num_samples=g.num_generations),
                              eos_id, self.tok.pad_id),
        sampling.make_sampler(graphdef, base, eos_id, self.tok.pad_id),
        None if reward is None else jax.jit(reward.score), exp_fn,
        state_lib.make_train_step(graphdef, lambda m, b: loss(m, b, hp), tx, mesh, shardings,
                                  batch_sh, g.optim.grad_accum_steps))

  def _rollout(self, state, prompts, it):
    g = self.section.num_generations
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), it)
    b = sharding.shard_batch({k: prompts[k] for k in ("tokens", "mask")}, self.mesh)
    out = self.programs.sampler(state.params, b["tokens"], b["mask"], rng)
    prompt, prompt_mask = (jnp.repeat(x, g, axis=0) for x in (b["tokens"], b["mask"]))
    batch = {"seq": jnp.concatenate([prompt, out["tokens"]], axis=1),
             "seq_mask": jnp.concatenate([prompt_mask, out["mask"]], axis=1),
             "response": out["tokens"], "mask": out["mask"]}
    index = np.repeat(prompts["index"], g)
    tokens, mask, logprobs = sharding.to_host((out["tokens"], out["mask"], out["logprobs"]))
    return batch, index, sampling.decode_rows(self.tok, tokens, mask), logprobs

  def _update(self, state, exp, it: int):
    c = self.section
    n = len(exp["mask"])
    mb, rows = n // c.num_minibatches, []
    for epoch in range(c.ppo_epochs):
      perm = np.random.default_rng([self.config.seed, it, epoch]).permutation(n)
      for k in range(c.num_minibatches):
        idx = perm[k * mb:(k + 1) * mb]
        batch = sharding.shard_global_batch({key: exp[key][idx] for key in EXP_KEYS}, self.mesh)
        state, m = self.programs.train_step(state, batch)
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        metrics_lib.check_finite(it, m)
        rows.append(m)
    metrics = metrics_lib.mean_metrics(rows)
    metrics["policy/first_minibatch_ratio"] = rows[0]["val/ratio"]
    return state, metrics

  def __call__(self, state, ref_params, prompts, it: int):
    t0 = time.perf_counter()
    with sharding.use_mesh(self.mesh):
      batch, index, texts, sample_logp = self._rollout(state, prompts, it)
      gold = None if self.gold_fn is None else self.gold_fn(index, texts)
      if self.reward is not None:
        scores = self.programs.score(self.reward.params, batch["seq"], batch["seq_mask"])
      else:
        scores = sharding.shard_global_batch({"s": gold}, self.mesh)["s"]
      exp, metrics = self.programs.experience(state.params, ref_params, batch, scores)
      exp = sharding.to_host(exp)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["policy/sample_logprob_gap"] = float(np.abs(sample_logp - exp["old_logp"]).max())
      state, update_metrics = self._update(state, exp, it)
    metrics.update(update_metrics)
    if gold is not None:
      metrics["gold/reward"] = float(np.mean(gold))
    metrics["time/iteration_s"] = time.perf_counter() - t0
    return state, metrics, list(zip(index, texts))


def _eval_batch(section) -> int:
  """Held-out prompts per sampling call: the responses of an iteration (64 by default, PPO's
  batch), so every algorithm's summary draws the same samples for the same prompts."""
  return section.data.batch_size * section.num_generations


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]
  state: Any  # the final TrainState of the policy
  compiled: dict[str, int]


def run(config, policy: artifacts.Policy, reward, prompts, mesh, workdir: str | None,
        rm_metrics: dict | None = None) -> Result:
  """Trains the SFT `policy` against `reward` (None: the task's gold reward) by the algorithm
  of `config.stage` (grpo, rloo or reinforce_pp)."""
  stage = config.stage
  g = config[stage]
  policy = artifacts.start_lora_stage(config, stage, policy, workdir, mesh)
  tx = optim.make_optimizer(g.optim)
  # The SFT policy stays the reference: with LoRA the base is shared, else all is copied.
  state, shardings = state_lib.create_from(policy.params, tx, mesh, lora.trainable_of(policy.model_config))
  train_prompts = prompts.train
  iterate = Iteration(config, mesh, policy, reward, tx, shardings, evaluation.gold_fn(prompts),
                      stage)
  batches = evaluation.prompt_batches(config, stage, prompts, policy.tokenizer, mesh)

  def step(it, state, prompt_batch):
    state, metrics, samples = iterate(state, policy.params, prompt_batch, it)
    if g.train.sample_every and (it % g.train.sample_every == 0 or it == 1):
      for i, text in samples[:g.train.num_samples_shown]:
        logging.info("[%s] sample | %s | %s", stage, train_prompts[i], text)
    return state, metrics

  runner = runner_lib.StageRunner(stage, workdir, runner_lib.LoopConfig.from_section(
      g.train, num_steps=g.num_iterations))
  # Its own jitted scorer: the held-out rows arrive placed otherwise than the rollout's, and
  # one more program there must not count as the training's recompiling (`compiled`).
  evaluate = evaluation.periodic_eval(
      config, policy, reward, iterate.programs.eval_sampler,
      None if reward is None else jax.jit(reward.score), prompts, mesh,
      _eval_batch(g)) if g.train.eval_every else None
  state, last = runner.run(step, state, batches, eval_fn=evaluate, log_keys=LOG_KEYS)
  compiled = iterate.programs.compiled()
  summary = evaluation.held_out_summary(config, stage, policy, state.params, reward,
                                        iterate.programs.eval_sampler, iterate.programs.score,
                                        prompts, mesh, _eval_batch(g))
  final = evaluation.finish(config, stage, runner, last, summary, rm_metrics, workdir)
  return Result(final, state, compiled)
