"""PPO against a reward with a KL penalty to the SFT policy (the InstructGPT stage).

One iteration (`Iteration.__call__`):
  1. rollout     sample responses to a batch of prompts with the policy (KV cache, one
                 program); decode them
  2. score       the normalised RM score of prompt + response ids, or a programmatic reward
                 (a bundled task's gold reward) computed on the host from the texts
  3. experience  no gradients: log-probs of policy and frozen reference (logits /
                 temperature), critic values; per-token reward -beta * KL_t plus the score at
                 the last response token; advantages (`ppo.advantage_estimator`); whitening
  4. update      ppo_epochs x minibatches of the registered policy + value losses, a fresh
                 permutation each epoch; optional early stop on the minibatch approx-KL
  5. beta        fixed, or Ziegler et al.'s adaptive controller
The math is in `rl/` (`core`, `advantages`, `losses`, `ppo_fn`); this file wires networks,
prompts and the stage runner. Reads `config.ppo` and the shared sections.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import artifacts, evaluation, sampling, sharding
from rlhf_jax.models import ActorCritic, PolicyModel, ScalarHead, ValueModel, lora
from rlhf_jax.rl import core, ensembles, ppo_fn
from rlhf_jax.train import metrics as metrics_lib, optim, runner as runner_lib, state as state_lib

LOG_KEYS = ("objective/scores", "objective/kl", "gold/reward", "loss/policy", "loss/value",
            "policy/clipfrac", "kl_coef")


def init_actor_critic(config, policy_cfg, policy_params, reward, mesh):
  """(graphdef, train state, its shardings, optimizer) of what PPO trains: the policy as a
  copy of `policy_params` (the SFT policy, which stays frozen as reference) and the critic
  chosen by `ppo.critic`. With LoRA (`policy_cfg.lora`, `policy_params` then the SFT policy's
  `artifacts.lora_view`) nothing is copied: policy and critic train adapters (and the value
  head) on the frozen base arrays, which the reference shares."""
  p = config.ppo
  critic_cfg = policy_cfg
  if p.critic == "reward":
    critic_cfg = dataclasses.replace(reward.critic_source.model_config, lora=policy_cfg.lora)

  def create():
    rngs = nnx.Rngs(params=config.seed)
    if p.critic == "shared":
      return ActorCritic(PolicyModel(policy_cfg, rngs),
                         value_head=ScalarHead(policy_cfg, 0.0, rngs))
    return ActorCritic(PolicyModel(policy_cfg, rngs), critic=ValueModel(critic_cfg, rngs))

  if policy_cfg.lora.enabled:
    ac_graphdef, ac_params = lora.attach(create, _lora_base(config, policy_cfg, policy_params,
                                                            reward, mesh), config.seed, mesh)
    trainable = lora.trainable_of(policy_cfg)
  else:
    ac_graphdef, ac_params = _dense_actor_critic(config, create, policy_params, reward, mesh)
    trainable = None
  tx = optim.make_optimizer(p.optim)
  state, shardings = state_lib.create_train_state(ac_params, tx, mesh, trainable)
  return ac_graphdef, state, shardings, tx


def _dense_actor_critic(config, create, policy_params, reward, mesh):
  """(graphdef, params) of a fully trained actor-critic: copies of the SFT policy (and of the
  critic's source trunk), so that the SFT params stay the reference."""
  p = config.ppo
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  init = {"policy": nnx.to_pure_dict(copy(policy_params))}
  if p.critic == "reward":  # TRL's default: the critic is the RM, re-headed
    source = reward.critic_source  # the RM itself; an ensemble's first member
    init["critic"] = {"trunk": nnx.to_pure_dict(copy(source.params["trunk"])),
                      "value_head": calibrated_value_head(source)}
  elif p.critic == "sft":  # SFT trunk, zero value head
    init["critic"] = {"trunk": nnx.to_pure_dict(copy(policy_params["trunk"]))}
  # "shared": a zero value head on the policy trunk, nothing to copy.
  ac_graphdef, ac_params = sharding.init_sharded(create, mesh)
  nnx.replace_by_pure_dict(ac_params, init)
  return ac_graphdef, ac_params


def _lora_base(config, policy_cfg, policy_params, reward, mesh) -> nnx.State:
  """The dense actor-critic's state a LoRA one adapts, from the very arrays of the SFT policy
  and the critic's source trunk (nothing copied), with a fresh or calibrated value head."""
  p = config.ppo
  head_cfg = reward.critic_source.model_config if p.critic == "reward" else policy_cfg
  _, head = sharding.init_sharded(lambda: ScalarHead(head_cfg, 0.0, nnx.Rngs(0)), mesh)
  if p.critic == "reward":
    nnx.replace_by_pure_dict(head, calibrated_value_head(reward.critic_source))
  base = {"policy": lora.base_state(policy_params)}
  if p.critic == "shared":
    base["value_head"] = head
  else:
    trunk = (reward.critic_source.params if p.critic == "reward" else policy_params)["trunk"]
    base["critic"] = nnx.State({"trunk": lora.base_state(trunk), "value_head": head})
  return nnx.State(base)


def calibrated_value_head(reward: artifacts.RewardFunction) -> dict:
  """The RM's head with its normalisation folded in (w = gain * w_rm, b = gain * b_rm + bias,
  as a pure dict): on the RM's trunk it predicts at a sequence's last token exactly the score
  PPO trains on, `reward.score = gain * raw + bias`, not the raw score."""
  head = nnx.to_pure_dict(reward.params["reward_head"])
  fold = jax.jit(lambda h, gain, bias: {"w_Dx1": gain * h["w_Dx1"],
                                        "b_1": gain * h["b_1"] + bias})
  return fold(head, jnp.float32(reward.gain), jnp.float32(reward.bias))


@dataclasses.dataclass
class Programs:
  """PPO's compiled functions. `calls` maps each name to (function, abstract arguments of its
  first call), for cost analysis and HLO dumps (benchmarks/)."""
  sampler: Callable
  score: Callable | None  # jitted RM score, None with a programmatic reward
  experience: Callable
  train_step: state_lib.TrainStep
  calls: dict[str, tuple[Callable, Any]] = dataclasses.field(default_factory=dict)

  def call(self, name: str, *args):
    fn = getattr(self, name)
    if name not in self.calls:  # the train step: its compiled function and that one's args
      jitted, jargs = ((fn.jitted, fn.args(*args)) if isinstance(fn, state_lib.TrainStep)
                       else (fn, args))
      self.calls[name] = (jitted, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
          if isinstance(x, jax.Array) else x, jargs))
    return fn(*args)

  def compiled(self) -> dict[str, int]:
    """Programs compiled per function: 1 each means no recompilation across iterations."""
    fns = {k: getattr(self, k) for k in ("sampler", "score", "experience", "train_step")}
    return {k: getattr(f, "jitted", f)._cache_size() for k, f in fns.items() if f}


@dataclasses.dataclass
class Rollout:
  batch: dict[str, jax.Array]  # seq, seq_mask [B, P+N]; response, mask [B, N] (on the mesh)
  tokens: np.ndarray  # [B, N] sampled response tokens (host)
  mask: np.ndarray  # [B, N]
  logprobs: np.ndarray  # [B, N] log-probs recorded while sampling
  index: np.ndarray  # [B] prompt indices
  tokenizer: Any

  @functools.cached_property
  def texts(self) -> list[str]:
    """The decoded responses (decoded on first use: a run that never reads them, such as the
    benchmark, does not pay for it)."""
    return sampling.decode_rows(self.tokenizer, self.tokens, self.mask)


class Iteration:
  """One PPO iteration as `(state, ref_params, prompts, it, beta) -> (state, metrics, beta,
  rollout)`, and its parts `rollout`, `experience` and `update`."""

  def __init__(self, config, mesh, ac_graphdef, policy: artifacts.Policy, reward, tx,
               shardings, gold_fn: Callable | None = None,
               watch: evaluation.Monitor | None = None):
    """`gold_fn(index, texts) -> [B] float32` or None: a programmatic reward of the decoded
    responses (the scores when `reward` is None, a metric otherwise). `watch`: an RM ensemble
    whose disagreement and mean score of the rollouts are logged as
    `reward/ensemble_std` and `reward/ensemble_mean`."""
    p = config.ppo
    self.config, self.mesh, self.reward, self.gold_fn = config, mesh, reward, gold_fn
    self.watch = watch
    self.tok = policy.tokenizer
    self.hp = core.RLParams.from_config(p, config.sampling.temperature)
    eos_id = self.tok.eos_id
    sampler = sampling.make_sampler(
        policy.graphdef, sampling.from_config(config.sampling, config.data.max_completion_len),
        eos_id, self.tok.pad_id)
    score = None if reward is None else jax.jit(reward.score)
    hp, ref_graphdef = self.hp, policy.graphdef
    experience = jax.jit(lambda ac, ref, batch, scores, beta: ppo_fn.experience(
        ac_graphdef, ref_graphdef, ac, ref, batch, scores, beta, hp, eos_id))
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in ppo_fn.EXP_KEYS}
    train_step = state_lib.make_train_step(ac_graphdef, lambda m, b: ppo_fn.loss(m, b, hp), tx,
                                           mesh, shardings, batch_sh, p.optim.grad_accum_steps)
    self.programs = Programs(sampler, score, experience, train_step)

  def rollout(self, state, prompts, it: int) -> Rollout:
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), it)
    b = sharding.shard_batch({k: prompts[k] for k in ("tokens", "mask", "index")}, self.mesh)
    out = self.programs.call("sampler", state.params["policy"], b["tokens"], b["mask"], rng)
    batch = {"seq": jnp.concatenate([b["tokens"], out["tokens"]], axis=1),
             "seq_mask": jnp.concatenate([b["mask"], out["mask"]], axis=1),
             "response": out["tokens"], "mask": out["mask"]}
    # Every process gets the whole global batch (its rows are spread over processes), so
    # host-side numbers are the same everywhere.
    tokens, mask, logprobs, index = sharding.to_host((out["tokens"], out["mask"],
                                                      out["logprobs"], b["index"]))
    return Rollout(batch, tokens, mask, logprobs, index, self.tok)

  def experience(self, state, ref_params, rollout: Rollout, beta: float, gold):
    """(experience as host arrays, metrics) with the RM's scores, or `gold` as the scores."""
    if self.reward is not None:
      scores = self.programs.call("score", self.reward.params, rollout.batch["seq"],
                                  rollout.batch["seq_mask"])
    else:
      scores = sharding.shard_global_batch({"s": gold}, self.mesh)["s"]
    exp, metrics = self.programs.call("experience", state.params, ref_params, rollout.batch,
                                      scores, jnp.float32(beta))
    exp = sharding.to_host(exp)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if self.watch is not None:  # the early-warning signals: no gold needed
      scores_KxB = self.watch.scores(self.watch.params, rollout.batch["seq"],
                                     rollout.batch["seq_mask"])
      metrics["reward/ensemble_std"] = float(ensembles.disagreement(scores_KxB))
      metrics["reward/ensemble_mean"] = float(scores_KxB.mean())
    metrics["policy/sample_logprob_gap"] = float(np.abs(rollout.logprobs - exp["old_logp"]).max())
    return exp, metrics

  def update(self, state, exp, it: int):
    """ppo_epochs x num_minibatches steps; (state, mean metrics of the steps run)."""
    p, bs = self.config.ppo, self.config.ppo.data.batch_size
    rows, stopped_early = [], False
    mb = bs // p.num_minibatches
    for epoch in range(p.ppo_epochs):
      perm = np.random.default_rng([self.config.seed, it, epoch]).permutation(bs)
      for k in range(p.num_minibatches):
        idx = perm[k * mb:(k + 1) * mb]
        mb_batch = sharding.shard_global_batch({key: exp[key][idx] for key in ppo_fn.EXP_KEYS},
                                               self.mesh)
        state, m = self.programs.call("train_step", state, mb_batch)
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        metrics_lib.check_finite(it, m)
        rows.append(m)
        stopped_early = bool(p.target_approxkl and m["policy/approxkl"] > p.target_approxkl)
        if stopped_early:
          break
      if stopped_early:
        break
    metrics = metrics_lib.mean_metrics(rows)
    metrics["policy/first_minibatch_ratio"] = rows[0]["val/ratio"]
    metrics["policy/epochs_stopped_early"] = float(stopped_early)
    return state, metrics

  def __call__(self, state, ref_params, prompts, it: int, beta: float):
    p = self.config.ppo
    t0 = time.perf_counter()
    with sharding.use_mesh(self.mesh):
      rollout = self.rollout(state, prompts, it)
      t_rollout = time.perf_counter()
      gold = None if self.gold_fn is None else self.gold_fn(rollout.index, rollout.texts)
      exp, metrics = self.experience(state, ref_params, rollout, beta, gold)
      t_exp = time.perf_counter()
      state, update_metrics = self.update(state, exp, it)
    metrics.update(update_metrics)
    if gold is not None:
      metrics["gold/reward"] = float(np.mean(gold))
    metrics["kl_coef"] = beta
    if p.adaptive_kl:
      beta = core.adaptive_kl_coef(beta, metrics["objective/kl"], p.kl_target, p.kl_horizon,
                                   p.data.batch_size)
    t_end = time.perf_counter()
    metrics.update({"time/rollout_s": t_rollout - t0, "time/experience_s": t_exp - t_rollout,
                    "time/update_s": t_end - t_exp, "time/iteration_s": t_end - t0})
    return state, metrics, beta, rollout


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]  # the last iteration's metrics and the held-out summary
  state: Any  # the final TrainState of the actor-critic
  compiled: dict[str, int]  # programs per compiled function
  programs: Programs  # the compiled functions and the abstract arguments of their first calls


def run(config, policy: artifacts.Policy, reward, prompts, mesh, workdir: str | None,
        rm_metrics: dict | None = None, monitor=None) -> Result:
  """Trains the SFT `policy` against `reward` (an `artifacts.RewardFunction` or a
  `lab.ensemble.RewardEnsemble`, or None to score with the task's gold reward). `prompts`:
  `train`, `eval` prompt lists and `task` (or None). `monitor`: an RM ensemble only watched,
  its disagreement and mean score logged (`reward/ensemble_{std,mean}`, `eval/...`, the
  summary's)."""
  p = config.ppo
  watch = evaluation.monitor(monitor)
  policy = artifacts.start_lora_stage(config, "ppo", policy, workdir, mesh)
  ac_graphdef, state, shardings, tx = init_actor_critic(config, policy.model_config,
                                                        policy.params, reward, mesh)
  train_prompts = prompts.train
  iterate = Iteration(config, mesh, ac_graphdef, policy, reward, tx, shardings,
                      evaluation.gold_fn(prompts), watch)
  batches = evaluation.prompt_batches(config, "ppo", prompts, policy.tokenizer, mesh)
  carry = {"kl_coef": float(p.kl_coef)}

  def step(it, state, prompt_batch):
    state, metrics, carry["kl_coef"], rollout = iterate(state, policy.params, prompt_batch, it,
                                                        carry["kl_coef"])
    if p.train.sample_every and (it % p.train.sample_every == 0 or it == 1):
      for i, text in list(zip(rollout.index, rollout.texts))[:p.train.num_samples_shown]:
        logging.info("[ppo] sample | %s | %s", train_prompts[i], text)
    return state, metrics

  runner = runner_lib.StageRunner("ppo", workdir, runner_lib.LoopConfig.from_section(
      p.train, num_steps=p.num_iterations))
  evaluate = evaluation.periodic_eval(
      config, policy, reward, iterate.programs.sampler, iterate.programs.score, prompts, mesh,
      p.data.batch_size, lambda st: st.params["policy"], watch) if p.train.eval_every else None
  state, last = runner.run(step, state, batches, carry=carry, eval_fn=evaluate,
                           log_keys=LOG_KEYS)
  compiled = iterate.programs.compiled()  # before the summary samples with the same sampler
  summary = evaluation.held_out_summary(
      config, "ppo", policy, state.params["policy"], reward, iterate.programs.sampler,
      iterate.programs.score, prompts, mesh, p.data.batch_size, watch=watch)
  final = evaluation.finish(config, "ppo", runner, last, summary, rm_metrics, workdir)
  return Result(final, state, compiled, iterate.programs)
