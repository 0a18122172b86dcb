"""One PPO iteration of the library (`ppo.Iteration`, what `ppo.run`'s loop calls).

`ppo.run` is handed its SFT policy and RM by the pipeline (from checkpoints or earlier
stages); the benchmark starts from random networks instead, so this file repeats only that:

  build          = what the pipeline hands `ppo.run`, from freshly initialised networks
                   (random policy and RM), then `ppo.init_actor_critic` as `ppo.run` calls it
  BenchIteration = `ppo.Iteration` itself: rollout, RM score, experience, the update epochs
                   and the KL controller, with every host round-trip `ppo.run` has. Left out
                   (in `ppo.run`): response text decoding and gold reward (no tokenizer /
                   task here), metric writing, sample printing, checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from rlhf_jax import artifacts, config as config_lib, sharding
from rlhf_jax.models import PolicyModel, RewardModel
from rlhf_jax.stages import ppo


def bench_config(batch: int, prompt: int, response: int, epochs: int, minibatches: int,
                 optim_cfg: dict, seed: int = 0):
  """The library's PPO config with the benchmark's settings (TRL defaults where they differ)."""
  c = config_lib.ppo_config()
  c.seed = seed
  c.data.update(max_prompt_len=prompt, max_completion_len=response)
  c.ppo.data.batch_size = batch
  # Responses of exactly `response` tokens: EOS banned for all of them (TRL: stop_token=None).
  c.sampling.update(temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=response)
  c.ppo.update(ppo_epochs=epochs, num_minibatches=minibatches, clip_ratio=0.2, value_clip=0.2,
               vf_coef=0.1, entropy_coef=0.0, gamma=1.0, lam=0.95, kl_estimator="k1",
               kl_coef=0.05, adaptive_kl=False, whiten_rewards=False, score_clip=0.0,
               missing_eos_penalty=0.0, target_approxkl=0.0, critic="reward", reward="model")
  c.ppo.optim.update(**optim_cfg)
  return c


@dataclasses.dataclass
class SpecialIds:
  """What PPO's iteration reads of a tokenizer when nothing decodes the responses."""
  eos_id: int
  pad_id: int


@dataclasses.dataclass
class BenchSetup:
  mesh: Any
  policy: artifacts.Policy  # the frozen reference (= the "SFT policy")
  reward: artifacts.RewardFunction
  ac_graphdef: Any
  state: Any
  shardings: Any
  tx: Any


def build(config, model_cfg, mesh, eos_id: int, pad_id: int) -> BenchSetup:
  """What the pipeline hands `ppo.run` for `critic="reward"`, from random networks instead
  of checkpoints, then the same `ppo.init_actor_critic`."""
  seed = config.seed
  policy_graphdef, ref_params = sharding.init_sharded(
      lambda: PolicyModel(model_cfg, nnx.Rngs(params=seed)), mesh)
  rm_graphdef, rm_params = sharding.init_sharded(
      lambda: RewardModel(model_cfg, nnx.Rngs(params=seed + 1)), mesh)
  ids = SpecialIds(eos_id, pad_id)
  reward = artifacts.RewardFunction(rm_graphdef, rm_params, 1.0, 0.0, model_cfg, ids)
  policy = artifacts.Policy(policy_graphdef, ref_params, model_cfg, ids)
  ac_graphdef, state, shardings, tx = ppo.init_actor_critic(config, model_cfg, ref_params,
                                                             reward, mesh)
  return BenchSetup(mesh, policy, reward, ac_graphdef, state, shardings, tx)


class BenchIteration:
  """`(state, host_prompts, it) -> (state, metrics, phase_times)`: the library's
  `ppo.Iteration` (the body of `ppo.run`'s loop) with no host-side scoring (no task, so
  responses are never decoded). `phase_times`: rollout_s, experience_s, update_s, from the
  iteration's own time/ metrics."""

  def __init__(self, config, s: BenchSetup):
    self.inner = ppo.Iteration(config, s.mesh, s.ac_graphdef, s.policy, s.reward, s.tx,
                               s.shardings)
    self.ref_params = s.policy.params
    self.beta = float(config.ppo.kl_coef)

  def __call__(self, state, host, it):
    prompts = dict(host, index=np.arange(len(host["tokens"])))
    state, metrics, self.beta, _ = self.inner(state, self.ref_params, prompts, it, self.beta)
    phases = {k: metrics[f"time/{k}"] for k in ("rollout_s", "experience_s", "update_s")}
    return state, metrics, phases

  def programs(self):
    """(name, jitted function, abstract arguments of its first call) of each program."""
    return [(k, fn, fargs) for k, (fn, fargs) in self.inner.programs.calls.items()]

  def compiled(self) -> dict[str, int]:
    return self.inner.programs.compiled()
