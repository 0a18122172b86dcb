"""PPO against the reward model with a KL penalty to the SFT policy (the InstructGPT stage).

One iteration:
  1. rollout     sample responses to a batch of prompts with the policy (KV cache, one program)
  2. experience  no gradients: logprobs of policy and frozen reference (logits / temperature),
                 critic values, normalised RM score of prompt + response; per-token reward
                 -beta * KL_t, plus the score at the last response token; GAE; whitening
  3. update      ppo_epochs x minibatches of clipped policy loss + vf_coef * clipped value
                 loss - entropy_coef * entropy, a fresh permutation each epoch; optional early
                 stop when the minibatch approx-KL exceeds `target_approxkl`
  4. beta        fixed, or Ziegler et al.'s adaptive controller
The math is in `ppo_core.py`; this file wires models, data and the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import ppo_core, preferences, rm, sharding, sft
from rlhf_jax.data import batching, sources, tasks
from rlhf_jax.fileio import write_json
from rlhf_jax.models import PolicyModel, ValueModel, moe
from rlhf_jax.models.heads import ScalarHead
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import checkpoint, loop, optim, state as state_lib


class ActorCritic(nnx.Module):
  """What PPO trains, so that one optimizer and one jitted step update it all: the policy and
  a critic that is either a separate network (`critic`) or a value head on the policy's own
  trunk (`value_head`; half the compute, but value gradients then move the policy too)."""

  def __init__(self, policy: PolicyModel, critic: ValueModel | None = None,
               value_head: ScalarHead | None = None):
    if (critic is None) == (value_head is None):
      raise ValueError("ActorCritic takes exactly one of `critic` and `value_head`.")
    self.policy = policy
    self.critic = critic
    self.value_head = value_head

  def __call__(self, seq_BxT, mask_BxT):
    """(policy logits [B, T, V], values [B, T]) at every position."""
    if self.critic is not None:
      return self.policy(seq_BxT, mask_BxT)[0], self.critic(seq_BxT, mask_BxT)
    h_BxTxD, _ = self.policy.trunk(seq_BxT, mask_BxT)
    return self.policy.logits(h_BxTxD), self.value_head(h_BxTxD)

  def on_response(self, seq_BxT, mask_BxT, n: int):
    """(policy logits [B, N, V], values [B, N]) at the positions that predict the last N
    tokens of `seq_BxT`, the response. What PPO's experience pass and loss both use."""
    keep = response_positions(n)
    h_BxNxD, _ = self.policy.trunk(seq_BxT, mask_BxT, keep=keep)
    logits_BxNxV = self.policy.logits(h_BxNxD)
    if self.critic is not None:
      return logits_BxNxV, self.critic(seq_BxT, mask_BxT, keep=keep)
    return logits_BxNxV, self.value_head(h_BxNxD)


def response_positions(n: int) -> slice:
  """The positions that predict the N response tokens, P-1 .. P+N-2 of the sequence.

  The trunks return hidden states at these positions only (`Transformer`'s `keep`): the
  prompt positions' logits would be a [B, P, V] float32 buffer (and gradient) and head FLOPs
  for nothing, and their last-block queries and MLP are not needed either.
  """
  return slice(-n - 1, -1)


def ref_response_logits(ref: PolicyModel, seq_BxT, mask_BxT, n: int):
  """The frozen reference policy's logits at the response positions, [B, N, V]."""
  h_BxNxD, _ = ref.trunk(seq_BxT, mask_BxT, keep=response_positions(n))
  return ref.logits(h_BxNxD)


def make_experience_fn(ac_graphdef, ref_graphdef, reward: rm.RewardFunction | None, cfg,
                       eos_id: int):
  """Jitted `(ac_params, ref_params, rm_params, batch, beta) -> (experience, metrics)`.

  Scores come from the reward model, or, with `reward=None`, from `batch["scores"]` (a
  programmatic reward computed on the host, e.g. a bundled task's gold reward).
  """
  p = cfg.ppo
  temperature = cfg.sampling.temperature

  def experience(ac_params, ref_params, rm_params, batch, beta):
    ac = nnx.merge(ac_graphdef, ac_params)
    ref = nnx.merge(ref_graphdef, ref_params)
    seq, seq_mask, resp, mask = batch["seq"], batch["seq_mask"], batch["response"], batch["mask"]
    n = resp.shape[1]
    # The same forward as `ppo_loss`'s, so the first minibatch's ratio is exactly 1.
    logits, values = ac.on_response(seq, seq_mask, n)
    logp = ppo_core.token_logprobs(logits, resp, temperature) * mask
    entropy = ppo_core.token_entropy(logits, temperature)
    ref_logp = ppo_core.token_logprobs(ref_response_logits(ref, seq, seq_mask, n), resp,
                                       temperature) * mask
    values = values * mask
    if reward is None:
      scores = batch["scores"]
    else:
      scores = reward.score(rm_params, seq, seq_mask)
    has_eos = ((resp == eos_id) & (mask > 0)).any(axis=1)
    if p.missing_eos_penalty:
      scores = jnp.where(has_eos, scores, scores - p.missing_eos_penalty)
    if p.score_clip:
      scores = jnp.clip(scores, -p.score_clip, p.score_clip)
    kl = ppo_core.kl_per_token(logp, ref_logp, p.kl_estimator) * mask
    rewards, non_score = ppo_core.rlhf_rewards(kl, scores, mask, beta)
    if p.whiten_rewards:
      rewards = ppo_core.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo_core.gae(rewards, values, mask, p.gamma, p.lam)
    advantages = ppo_core.masked_whiten(advantages, mask)
    kl_sum = kl.sum(axis=1)
    metrics = {
        "objective/kl": kl_sum.mean(),
        "objective/entropy": (-logp).sum(axis=1).mean(),  # TRL's definition: sum of -log pi
        "objective/non_score_reward": non_score.sum(axis=1).mean(),
        "objective/scores": scores.mean(),
        "objective/rlhf_reward": (scores + non_score.sum(axis=1)).mean(),
        "val/num_eos_tokens": has_eos.sum(),
        "policy/entropy_rollout": ppo_core.masked_mean(entropy, mask),
        "response_length": mask.sum(axis=1).mean(),
    }
    exp = {"seq": seq, "seq_mask": seq_mask, "response": resp, "mask": mask, "old_logp": logp,
           "old_values": values, "advantages": advantages, "returns": returns}
    return exp, metrics

  return jax.jit(experience)


def ppo_loss(model: ActorCritic, batch, *, clip: float, value_clip: float, vf_coef: float,
             entropy_coef: float, temperature: float):
  n = batch["response"].shape[1]
  mask = batch["mask"]
  logits, values = model.on_response(batch["seq"], batch["seq_mask"], n)
  logp = ppo_core.token_logprobs(logits, batch["response"], temperature) * mask
  pg_loss, pg_metrics = ppo_core.policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                             clip)
  vf_loss, vf_metrics = ppo_core.value_loss(values, batch["old_values"], batch["returns"], mask,
                                            value_clip)
  # Without an entropy bonus the entropy is only a metric: no backward pass through it.
  entropy_logits = logits if entropy_coef else jax.lax.stop_gradient(logits)
  entropy = ppo_core.masked_mean(ppo_core.token_entropy(entropy_logits, temperature), mask)
  loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy
  # MoE trunks: load balancing + router z-loss of every network this forward ran (policy and
  # separate critic, or the shared trunk once); 0 and no metrics for dense models.
  aux, aux_metrics = moe.aux_loss(model)
  return loss + aux, {"loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": entropy,
                      **pg_metrics, **vf_metrics, **aux_metrics}


@dataclasses.dataclass
class Setup:
  """Everything an iteration needs, built once."""
  mesh: Any
  policy: sft.Policy  # the SFT policy: reference and starting point
  reward: rm.RewardFunction | None  # None: scores from the task's gold reward
  rm_metrics: dict
  ac_graphdef: Any
  state: Any
  shardings: Any
  tx: Any


def _build(config, workdir) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  p = config.ppo
  if p.reward not in ("model", "gold"):
    raise ValueError(f"ppo.reward is {p.reward!r}; choose 'model' (the trained RM) or 'gold' "
                     "(the bundled task's gold reward).")
  if p.critic not in ("reward", "sft", "shared"):
    raise ValueError(f"ppo.critic is {p.critic!r}; choose 'reward', 'sft' or 'shared'.")
  if p.reward == "gold" and (config.data.prompts_path or config.rm_checkpoint):
    raise ValueError("ppo.reward='gold' scores with a bundled task: unset data.prompts_path "
                     "and rm_checkpoint, or use ppo.reward='model'.")
  if p.reward == "gold" and p.critic == "reward":
    raise ValueError("ppo.critic='reward' starts the critic from the reward model, which "
                     "ppo.reward='gold' does not train; set --config.ppo.critic=sft or shared.")
  policy = sft.ensure_policy(config.rm.sft, workdir, mesh, config.sft_checkpoint)
  m = policy.model_config.moe
  if m.num_experts and not (m.dropless and m.router_jitter == 0):
    # Capacity-based routing drops tokens depending on which tokens are routed together, so
    # one-token decode steps and the training forward would disagree: ratio != 1.
    raise ValueError("PPO with an MoE policy needs model.moe.dropless=True and "
                     "model.moe.router_jitter=0 (sampler and training forward must agree); "
                     "train SFT with them, e.g. --config=configs/ppo.py:moe.")
  reward, rm_metrics = None, {}
  if p.reward == "model":
    reward, rm_metrics = rm.ensure_reward_model(config.rm, workdir, mesh, config.rm_checkpoint)
    if reward.tokenizer.vocab_size != policy.tokenizer.vocab_size:
      raise ValueError("the reward model and the policy use different tokenizers; train the "
                       "RM from this SFT run (same workdir) or pass matching checkpoints.")
  ac_graphdef, state, shardings, tx = init_actor_critic(
      config, policy.model_config, policy.params, reward, mesh)
  return Setup(mesh, policy, reward, rm_metrics, ac_graphdef, state, shardings, tx)


def init_actor_critic(config, policy_cfg, policy_params, reward: rm.RewardFunction | None, mesh):
  """(graphdef, train state, its shardings, optimizer) of what PPO trains: the policy as a
  copy of `policy_params` (the SFT policy, which stays frozen as reference) and the critic
  chosen by `ppo.critic`."""
  p = config.ppo
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  init = {"policy": nnx.to_pure_dict(copy(policy_params))}
  if p.critic == "reward":  # TRL's default: the critic is the RM, re-headed
    init["critic"] = {"trunk": nnx.to_pure_dict(copy(reward.params["trunk"])),
                      "value_head": nnx.to_pure_dict(copy(reward.params["reward_head"]))}
  elif p.critic == "sft":  # SFT trunk, zero value head
    init["critic"] = {"trunk": nnx.to_pure_dict(copy(policy_params["trunk"]))}
  # "shared": a zero value head on the policy trunk, nothing to copy.

  def create():
    rngs = nnx.Rngs(params=config.seed)
    if p.critic == "shared":
      return ActorCritic(PolicyModel(policy_cfg, rngs),
                         value_head=ScalarHead(policy_cfg, 0.0, rngs))
    critic_cfg = reward.model_config if p.critic == "reward" else policy_cfg
    return ActorCritic(PolicyModel(policy_cfg, rngs), critic=ValueModel(critic_cfg, rngs))

  ac_graphdef, ac_params = sharding.init_sharded(create, mesh)
  nnx.replace_by_pure_dict(ac_params, init)
  tx = optim.make_optimizer(config.optim)
  state, shardings = state_lib.create_train_state(ac_params, tx, mesh)
  return ac_graphdef, state, shardings, tx


def _prompts(config, split: str, n: int):
  d = config.data
  if d.prompts_path:
    if not d.eval_prompts_path:
      raise ValueError("data.prompts_path is set but data.eval_prompts_path is not; give "
                       "held-out prompts for the final SFT-vs-PPO comparison.")
    recs = sources.read_jsonl(d.prompts_path if split == "train" else d.eval_prompts_path,
                              "prompt")
    return [r["prompt"] for r in recs][:n], None
  task = tasks.get_task(d.task)
  return [r["prompt"] for r in task.prompts(n, config.seed, split)], task


EXP_KEYS = ("seq", "seq_mask", "response", "mask", "old_logp", "old_values", "advantages",
            "returns")


def make_iteration(config, mesh, ac_graphdef, policy_graphdef, reward: rm.RewardFunction | None,
                   tx, shardings, eos_id: int, pad_id: int):
  """One PPO iteration (steps 1-4 of the module docstring) as
  `iterate(state, ref_params, prompts, it, beta, on_rollout=None) -> (state, metrics, beta)`.

  `prompts`: host arrays `tokens`, `mask` [B, P] and `index` [B]. `on_rollout(tokens, mask,
  index)` runs on the host between rollout and experience with the sampled responses of the
  whole batch; it returns the per-response gold reward (the scores when `reward` is None, a
  metric otherwise) or None. The returned beta is the KL coefficient for the next iteration.
  `iterate.jitted` are the compiled functions (one program each when nothing recompiles);
  `iterate.calls` maps their names to (function, abstract arguments of the first call), for
  cost analysis and HLO dumps (benchmarks/).
  """
  d, p = config.data, config.ppo
  if d.batch_size % p.num_minibatches:
    raise ValueError(f"data.batch_size {d.batch_size} must divide by ppo.num_minibatches "
                     f"{p.num_minibatches}.")
  sampling_cfg = SamplingConfig(max_new_tokens=d.max_completion_len,
                                temperature=config.sampling.temperature,
                                top_k=config.sampling.top_k, top_p=config.sampling.top_p,
                                min_new_tokens=config.sampling.min_new_tokens)
  sampler = make_sampler(policy_graphdef, sampling_cfg, eos_id, pad_id)
  experience_fn = make_experience_fn(ac_graphdef, policy_graphdef, reward, config, eos_id)
  loss_fn = functools.partial(ppo_loss, clip=p.clip_ratio, value_clip=p.value_clip,
                              vf_coef=p.vf_coef, entropy_coef=p.entropy_coef,
                              temperature=config.sampling.temperature)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in EXP_KEYS}
  train_step = state_lib.make_train_step(ac_graphdef, loss_fn, tx, mesh, shardings, batch_sh,
                                         config.optim.grad_accum_steps)
  step_fn = getattr(train_step, "jitted", train_step)  # called under the mesh below
  calls = {}

  def call(name, fn, *args):
    if name not in calls:
      calls[name] = (fn, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
          if isinstance(x, jax.Array) else x, args))
    return fn(*args)

  def iterate(state, ref_params, prompts, it: int, beta: float, on_rollout=None):
    t0 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), it)
    with sharding.use_mesh(mesh):
      b = sharding.shard_batch({k: prompts[k] for k in ("tokens", "mask", "index")}, mesh)
      out = call("sampler", sampler, state.params["policy"], b["tokens"], b["mask"], rng)
      # Every process gets the whole global batch (its rows are spread over processes), so
      # host-side numbers are the same everywhere.
      resp_tokens, resp_mask, index = sharding.to_host((out["tokens"], out["mask"], b["index"]))
      t_rollout = time.perf_counter()
      gold = None if on_rollout is None else on_rollout(resp_tokens, resp_mask, index)
      batch = {"seq": jnp.concatenate([b["tokens"], out["tokens"]], axis=1),
               "seq_mask": jnp.concatenate([b["mask"], out["mask"]], axis=1),
               "response": out["tokens"], "mask": out["mask"]}
      if reward is None:
        if gold is None:
          raise ValueError("ppo.reward='gold' needs scores from on_rollout.")
        batch["scores"] = sharding.shard_global_batch({"scores": gold}, mesh)["scores"]
      exp, metrics = call("experience", experience_fn, state.params, ref_params,
                          None if reward is None else reward.params, batch, jnp.float32(beta))
    exp = sharding.to_host(exp)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["policy/sample_logprob_gap"] = float(np.abs(
        sharding.to_host(out["logprobs"]) - exp["old_logp"]).max())
    if gold is not None:
      metrics["gold/reward"] = float(np.mean(gold))
    t_exp = time.perf_counter()

    update_rows, stopped_early = [], False
    mb = d.batch_size // p.num_minibatches
    for epoch in range(p.ppo_epochs):
      perm = np.random.default_rng([config.seed, it, epoch]).permutation(d.batch_size)
      for k in range(p.num_minibatches):
        idx = perm[k * mb:(k + 1) * mb]
        mb_batch = sharding.shard_global_batch({key: exp[key][idx] for key in EXP_KEYS}, mesh)
        with sharding.use_mesh(mesh):
          state, m = call("train_step", step_fn, state, mb_batch)
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        loop.check_finite(it, m)
        update_rows.append(m)
        if p.target_approxkl and m["policy/approxkl"] > p.target_approxkl:
          stopped_early = True
          break
      if stopped_early:
        break
    metrics.update(loop.mean_metrics(update_rows))
    metrics["policy/first_minibatch_ratio"] = update_rows[0]["val/ratio"]
    metrics["policy/epochs_stopped_early"] = float(stopped_early)
    metrics["kl_coef"] = beta
    if p.adaptive_kl:
      beta = ppo_core.adaptive_kl_coef(beta, metrics["objective/kl"], p.kl_target, p.kl_horizon,
                                       d.batch_size)
    t_end = time.perf_counter()
    metrics.update({"time/rollout_s": t_rollout - t0, "time/experience_s": t_exp - t_rollout,
                    "time/update_s": t_end - t_exp, "time/iteration_s": t_end - t0})
    return state, metrics, beta

  iterate.jitted = {"sampler": sampler, "experience": experience_fn, "train_step": step_fn}
  iterate.calls = calls
  return iterate


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  d, p = config.data, config.ppo
  s = _build(config, workdir)
  mesh, tok = s.mesh, s.policy.tokenizer
  train_prompts, task = _prompts(config, "train", d.num_train_prompts)
  eval_prompts, _ = _prompts(config, "eval", d.num_eval_prompts)
  arrays = batching.prompt_arrays(train_prompts, tok, d.max_prompt_len)
  arrays["index"] = np.arange(len(train_prompts))
  prompt_batches = batching.EpochIterator(arrays, d.batch_size, config.seed,
                                          *sharding.process_block(mesh))
  iterate = make_iteration(config, mesh, s.ac_graphdef, s.policy.graphdef, s.reward, s.tx,
                           s.shardings, tok.eos_id, tok.pad_id)

  out_dir = sft.stage_dir(workdir, "ppo")
  writer = loop.MetricsWriter(workdir, "ppo")
  ckpt = None
  state, beta, start = s.state, float(p.kl_coef), 0
  if out_dir:
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"),
                                   config.train.checkpoint_every, config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(state)
      prompt_batches.position = int(meta["data_position"])
      beta, start = float(meta["kl_coef"]), int(meta["iteration"])
      writer.drop_after(start)
      logging.info("[ppo] resumed at iteration %d (kl_coef %.4g)", start, beta)

  last: dict[str, float] = {}
  t_start = time.perf_counter()
  for it in range(start + 1, p.num_iterations + 1):
    samples = []

    def on_rollout(resp_tokens, resp_mask, index):
      texts = [tok.decode(t[m.astype(bool)]) for t, m in zip(resp_tokens, resp_mask)]
      samples[:] = [(train_prompts[i], a) for i, a in zip(index, texts)]
      if task is None:
        return None
      return np.array([task.gold_reward(q, a) for q, a in samples], np.float32)

    state, metrics, beta = iterate(state, s.policy.params, next(prompt_batches), it, beta,
                                   on_rollout)
    writer.write(it, metrics)
    logging.info("[ppo] iter %d/%d (%.0fs) score=%.3f kl=%.3f gold=%.3f loss/policy=%.4f "
                 "loss/value=%.4f clipfrac=%.3f kl_coef=%.4f", it, p.num_iterations,
                 time.perf_counter() - t_start, metrics["objective/scores"],
                 metrics["objective/kl"], metrics.get("gold/reward", float("nan")),
                 metrics["loss/policy"], metrics["loss/value"], metrics["policy/clipfrac"], beta)
    if config.train.sample_every and (it % config.train.sample_every == 0 or it == 1):
      for q, a in samples[:config.train.num_samples_shown]:
        logging.info("[ppo] sample | %s | %s", q, a)
    if ckpt:
      ckpt.maybe_save(it, state, {"data_position": prompt_batches.position, "kl_coef": beta,
                                  "iteration": it}, force=it == p.num_iterations)
    last = metrics
  if ckpt:
    ckpt.close()

  summary = _summary(config, s, state, eval_prompts, task)
  summary["final/kl"] = last.get("objective/kl", float("nan"))
  if "eval_accuracy" in s.rm_metrics:
    summary["rm/eval_accuracy"] = s.rm_metrics["eval_accuracy"]
  if "eval_gold_agreement" in s.rm_metrics:
    summary["rm/eval_gold_agreement"] = s.rm_metrics["eval_gold_agreement"]
  writer.write(p.num_iterations, summary)
  writer.close()
  if out_dir:
    write_json(os.path.join(out_dir, "summary.json"), summary)
  for k, v in sorted(summary.items()):
    logging.info("[ppo] summary %s = %.4f", k, v)
  # Programs compiled per jitted function: 1 each means no recompilation across iterations.
  compiled = {k: f._cache_size() for k, f in iterate.jitted.items()}
  return {"metrics": {**last, **summary}, "state": state, "compiled": compiled}


def _summary(config, s: Setup, state, eval_prompts, task) -> dict[str, float]:
  """Gold reward and RM score of the SFT vs the PPO policy on the same held-out prompts."""
  d = config.data
  out = {}
  for name, params in (("sft", s.policy.params), ("ppo", state.params["policy"])):
    pol = sft.Policy(s.policy.graphdef, params, s.policy.model_config, s.policy.tokenizer)
    texts = preferences.sample_completions(pol, eval_prompts, s.mesh, d.max_prompt_len,
                                           d.max_completion_len, config.sampling,
                                           d.batch_size, config.seed + 7)
    if s.reward is not None:
      raw = rm.score_texts(s.reward.graphdef, s.reward.params, s.policy.tokenizer, eval_prompts,
                           texts, d.max_prompt_len, d.max_completion_len, d.batch_size, s.mesh)
      out[f"final/{name}_rm_score"] = float(np.mean(s.reward.gain * raw + s.reward.bias))
    if task is not None:
      out[f"final/{name}_gold_reward"] = float(np.mean(
          [task.gold_reward(q, a) for q, a in zip(eval_prompts, texts)]))
  return out
