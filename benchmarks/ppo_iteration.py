"""One PPO iteration of the library (`ppo.make_iteration`, what `ppo.run`'s loop calls).

`ppo.run` builds its models from SFT/RM checkpoints (`ppo._build`); the benchmark starts
from random networks instead, so this file repeats only that part:

  build          = `ppo._build` from freshly initialised networks instead of checkpoints
                   (random policy and RM, then `ppo.init_actor_critic` as `ppo._build` calls it)
  make_iteration = `ppo.make_iteration` itself: rollout, experience, the update epochs and
                   the KL controller, with every host round-trip `ppo.run` has. Left out (in
                   `ppo.run`'s `on_rollout` and loop): response text decoding and gold reward
                   (no tokenizer / task here), metric writing, sample printing, checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from rlhf_jax import config as config_lib, ppo, rm, sharding
from rlhf_jax.models import PolicyModel, RewardModel


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
  """`ppo._build` for `critic="reward"`, from random networks instead of checkpoints:
  the same `ppo.init_actor_critic`."""
  seed = config.seed
  policy_graphdef, ref_params = sharding.init_sharded(
      lambda: PolicyModel(model_cfg, nnx.Rngs(params=seed)), mesh)
  rm_graphdef, rm_params = sharding.init_sharded(
      lambda: RewardModel(model_cfg, nnx.Rngs(params=seed + 1)), mesh)
  reward = rm.RewardFunction(rm_graphdef, rm_params, 1.0, 0.0, model_cfg, None)

  ac_graphdef, state, shardings, tx = ppo.init_actor_critic(config, model_cfg, ref_params,
                                                             reward, mesh)
  return BenchSetup(mesh, policy_graphdef, ref_params, reward, ac_graphdef, state, shardings, tx)


def make_iteration(config, s: BenchSetup, eos_id: int, pad_id: int):
  """`iterate(state, host_prompts, it) -> (state, metrics, phase_times)`: the library's
  `ppo.make_iteration` (the body of `ppo.run`'s loop) with no host-side scoring (no
  tokenizer / task: ppo.run decodes texts and computes the gold reward in `on_rollout`).
  `phase_times`: rollout_s, experience_s, update_s, from the iteration's own time/ metrics."""
  inner = ppo.make_iteration(config, s.mesh, s.ac_graphdef, s.policy_graphdef, s.reward, s.tx,
                             s.shardings, eos_id, pad_id)
  beta_box = {"beta": float(config.ppo.kl_coef)}

  def iterate(state, host, it):
    prompts = dict(host, index=np.arange(len(host["tokens"])))
    state, metrics, beta_box["beta"] = inner(state, s.ref_params, prompts, it, beta_box["beta"])
    phases = {k: metrics[f"time/{k}"] for k in ("rollout_s", "experience_s", "update_s")}
    return state, metrics, phases

  iterate.jitted = inner.jitted
  iterate.programs = lambda: [(k, fn, fargs) for k, (fn, fargs) in inner.calls.items()]
  return iterate
