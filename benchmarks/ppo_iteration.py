"""One PPO iteration, composed from the library's jitted pieces exactly as `rlhf_jax.ppo.run`.

`ppo.run` builds its models from SFT/RM checkpoints (`ppo._build`) and keeps the iteration
inline in its loop, with checkpointing, text decoding and logging around it, so the
benchmark cannot call it directly. This file repeats only the wiring:

  build          = `ppo._build` from freshly initialised networks instead of checkpoints
                   (the same `ActorCritic`, critic started from the RM, `create_train_state`)
  make_iteration = the body of `ppo.run`'s `for it in ...` loop: rollout with `make_sampler`
                   (+ device_get of the responses), `make_experience_fn` (+ device_get of the
                   experience and metrics), `ppo_epochs x num_minibatches` `make_train_step`
                   calls on host-indexed minibatches (+ device_get of each step's metrics),
                   then the KL controller. Left out: response text decoding and gold reward
                   (no tokenizer / task here), metric writing, sample printing, checkpoints.

Keep it in step with `ppo.run`; a `ppo.make_iteration(...)` in the library would replace it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import config as config_lib, ppo, ppo_core, rm, sharding
from rlhf_jax.models import PolicyModel, RewardModel, ValueModel
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import loop, optim, state as state_lib

EXP_KEYS = ("seq", "seq_mask", "response", "mask", "old_logp", "old_values", "advantages",
            "returns")


def bench_config(batch: int, prompt: int, response: int, epochs: int, minibatches: int,
                 optim_cfg: dict, seed: int = 0):
  """The library's PPO config with the benchmark's settings (TRL defaults where they differ)."""
  c = config_lib.ppo_config()
  c.seed = seed
  c.data.update(batch_size=batch, max_prompt_len=prompt, max_completion_len=response)
  # Responses of exactly `response` tokens: EOS banned for all of them (TRL: stop_token=None).
  c.sampling.update(temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=response)
  c.ppo.update(ppo_epochs=epochs, num_minibatches=minibatches, clip_ratio=0.2, value_clip=0.2,
               vf_coef=0.1, entropy_coef=0.0, gamma=1.0, lam=0.95, kl_estimator="k1",
               kl_coef=0.05, adaptive_kl=False, whiten_rewards=False, score_clip=0.0,
               missing_eos_penalty=0.0, target_approxkl=0.0, critic="reward", reward="model")
  c.optim.update(**optim_cfg)
  return c


@dataclasses.dataclass
class BenchSetup:
  mesh: Any
  policy_graphdef: Any
  ref_params: Any  # the frozen reference (= the "SFT policy")
  reward: rm.RewardFunction
  ac_graphdef: Any
  state: Any
  shardings: Any
  tx: Any


def build(config, model_cfg, mesh) -> BenchSetup:
  """`ppo._build` for `critic="reward"`, from random networks instead of checkpoints."""
  seed = config.seed
  policy_graphdef, ref_params = sharding.init_sharded(
      lambda: PolicyModel(model_cfg, nnx.Rngs(params=seed)), mesh)
  rm_graphdef, rm_params = sharding.init_sharded(
      lambda: RewardModel(model_cfg, nnx.Rngs(params=seed + 1)), mesh)
  reward = rm.RewardFunction(rm_graphdef, rm_params, 1.0, 0.0, model_cfg, None)

  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  init = {"policy": nnx.to_pure_dict(copy(ref_params)),
          "critic": {"trunk": nnx.to_pure_dict(copy(rm_params["trunk"])),
                     "value_head": nnx.to_pure_dict(copy(rm_params["reward_head"]))}}

  def create():
    rngs = nnx.Rngs(params=seed)
    return ppo.ActorCritic(PolicyModel(model_cfg, rngs), critic=ValueModel(model_cfg, rngs))

  ac_graphdef, ac_params = sharding.init_sharded(create, mesh)
  nnx.replace_by_pure_dict(ac_params, init)
  tx = optim.make_optimizer(config.optim)
  state, shardings = state_lib.create_train_state(ac_params, tx, mesh)
  return BenchSetup(mesh, policy_graphdef, ref_params, reward, ac_graphdef, state, shardings, tx)


def make_iteration(config, s: BenchSetup, eos_id: int, pad_id: int):
  """`iterate(state, host_prompts, it) -> (state, metrics, phase_times)`; the body of
  `ppo.run`'s loop. `phase_times`: rollout_s (as ppo.run's time/rollout_s), experience_s,
  update_s."""
  d, p = config.data, config.ppo
  mesh = s.mesh
  sampling_cfg = SamplingConfig(max_new_tokens=d.max_completion_len,
                                temperature=config.sampling.temperature,
                                top_k=config.sampling.top_k, top_p=config.sampling.top_p,
                                min_new_tokens=config.sampling.min_new_tokens)
  sampler = make_sampler(s.policy_graphdef, sampling_cfg, eos_id, pad_id)
  experience_fn = ppo.make_experience_fn(s.ac_graphdef, s.policy_graphdef, s.reward, config,
                                         eos_id)
  loss_fn = functools.partial(ppo.ppo_loss, clip=p.clip_ratio, value_clip=p.value_clip,
                              vf_coef=p.vf_coef, entropy_coef=p.entropy_coef,
                              temperature=config.sampling.temperature)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in EXP_KEYS}
  train_step = state_lib.make_train_step(s.ac_graphdef, loss_fn, s.tx, mesh, s.shardings,
                                         batch_sh, config.optim.grad_accum_steps)
  beta_box = {"beta": float(p.kl_coef)}
  programs = {}  # name -> (jitted, abstract example arguments), for cost analysis / profiling

  def remember(name, fn, *fargs):
    if name not in programs:
      programs[name] = (fn, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
          if isinstance(x, jax.Array) else x, fargs))

  def iterate(state, host, it):
    beta = beta_box["beta"]
    t0 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), it)
    with sharding.use_mesh(mesh):
      b = sharding.shard_batch({"tokens": host["tokens"], "mask": host["mask"]}, mesh)
      remember("sampler", sampler, state.params["policy"], b["tokens"], b["mask"], rng)
      out = sampler(state.params["policy"], b["tokens"], b["mask"], rng)
      resp_tokens, resp_mask = jax.device_get((out["tokens"], out["mask"]))
      t_rollout = time.perf_counter() - t0
      # (ppo.run decodes resp_tokens to texts here, for gold reward and sample logging)
      del resp_tokens, resp_mask
      batch = {"seq": jnp.concatenate([b["tokens"], out["tokens"]], axis=1),
               "seq_mask": jnp.concatenate([b["mask"], out["mask"]], axis=1),
               "response": out["tokens"], "mask": out["mask"]}
      remember("experience", experience_fn, state.params, s.ref_params, s.reward.params, batch,
               jnp.float32(beta))
      exp, metrics = experience_fn(state.params, s.ref_params, s.reward.params, batch,
                                   jnp.float32(beta))
    exp = jax.device_get(exp)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["policy/sample_logprob_gap"] = float(np.abs(
        jax.device_get(out["logprobs"]) - exp["old_logp"]).max())
    t_exp = time.perf_counter()

    update_rows, stopped_early = [], False
    mb = d.batch_size // p.num_minibatches
    for epoch in range(p.ppo_epochs):
      perm = np.random.default_rng([config.seed, it, epoch]).permutation(d.batch_size)
      for k in range(p.num_minibatches):
        idx = perm[k * mb:(k + 1) * mb]
        mb_batch = sharding.shard_batch({key: exp[key][idx] for key in EXP_KEYS}, mesh)
        remember("train_step", train_step.jitted, state, mb_batch)
        state, m = train_step(state, mb_batch)
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
      beta_box["beta"] = ppo_core.adaptive_kl_coef(beta, metrics["objective/kl"], p.kl_target,
                                                   p.kl_horizon, d.batch_size)
    t_end = time.perf_counter()
    metrics["time/rollout_s"] = t_rollout
    metrics["time/iteration_s"] = t_end - t0
    phases = {"rollout_s": t_rollout, "experience_s": t_exp - t0 - t_rollout,
              "update_s": t_end - t_exp}
    return state, metrics, phases

  iterate.jitted = {"sampler": sampler, "experience": experience_fn,
                    "train_step": train_step.jitted}
  iterate.programs = lambda: [(k, fn, fargs) for k, (fn, fargs) in programs.items()]
  return iterate
