"""Every enum and cross-field constraint of a run's config, checked before any stage runs.

Each error is one `ValueError` line naming the config key and the fix. `check(config)` reads
only the config; `check_artifacts(config)` also reads the folders named by `sft_checkpoint` /
`rm_checkpoint` (their network shape decides, e.g., whether PPO may use it).
"""

from __future__ import annotations

import os

from rlhf_jax import config as config_lib
from rlhf_jax.data import tasks
from rlhf_jax.data.tokenizer import TOKENIZER_KINDS
from rlhf_jax.models import TransformerConfig, lora
from rlhf_jax.rl import advantages, core, losses

SCHEDULES = ("cosine", "linear", "constant")
PPO_ESTIMATORS = ("gae",)  # what the PPO stage's one-sample-per-prompt rollout supports


def _choice(key: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{key} is {value!r}; choose one of {tuple(choices)}.")


def _positive(key: str, value) -> None:
  if not value > 0:
    raise ValueError(f"{key} must be positive, got {value!r}.")


def check(config) -> None:
  """Raises ValueError naming the first bad key of `config`."""
  _choice("stage", config.stage, config_lib.STAGES)
  _choice("retrain", config.retrain, ("",) + config_lib.stages_of(config))
  _check_shared(config)
  _check_lora(config)
  for name in config_lib.stages_of(config):
    if "optim" in config[name]:
      _check_optim(f"{name}.optim", config[name].optim)
    _check_train(f"{name}.train", config[name].train)
  _check_sft(config)
  if "rm" in config:
    _check_rm(config)
  if "ppo" in config:
    _check_ppo(config)
  for name in config_lib.GROUP_STAGES:
    if name in config:
      _check_group(config, name)
  if "dpo" in config:
    _check_dpo(config)
  if "best_of_n" in config:
    _check_best_of_n(config)


def _check_shared(config) -> None:
  t, d, s = config.tokenizer, config.data, config.sampling
  _choice("tokenizer.kind", t.kind, TOKENIZER_KINDS)
  if t.chat and t.kind != "hf":
    raise ValueError(f"tokenizer.chat needs a chat template, which only tokenizer.kind='hf' "
                     f"has (kind is {t.kind!r}).")
  if t.kind == "hf" and not t.model_path:
    raise ValueError("tokenizer.kind='hf' needs tokenizer.model_path: a Hugging Face tokenizer "
                     "directory, a GGUF file, or a bundled model name.")
  _choice("data.task", d.task, sorted(tasks.TASKS))
  _choice("data.truncation", d.truncation, ("truncate", "error"))
  _positive("data.max_prompt_len", d.max_prompt_len)
  _positive("data.max_completion_len", d.max_completion_len)
  if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or s.min_new_tokens < 0:
    raise ValueError("sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                     f"min_new_tokens >= 0; got {s.to_dict()}.")
  if not config.init_from:  # else the pretrained checkpoint decides the architecture
    TransformerConfig.from_config(dict(config.model, vocab_size=256))


def _check_lora(config) -> None:
  """The adapters' keys, which stages may use them, and no dropout where RL replays."""
  if "lora" not in config or not config.lora.rank:
    return
  lora.LoRAConfig.from_config(config.lora)  # rank, alpha, dropout, targets: one line each
  trained = [s for s in config_lib.stages_of(config) if s != "best_of_n"]
  stages = [s.strip() for s in str(config.lora.stages).split(",") if s.strip()]
  unknown = [s for s in stages if s != "all" and s not in config_lib.STAGES]
  if unknown or not stages:
    raise ValueError(f"lora.stages is {config.lora.stages!r}; give 'all' or a comma-separated "
                     f"list of the training stages {','.join(trained)}.")
  rl = [s for s in trained if s in config_lib.RL_STAGES and lora.for_stage(config, s).enabled]
  if config.lora.dropout and rl:
    raise ValueError(f"lora.dropout is {config.lora.dropout} but {rl[0]} trains adapters: RL "
                     "stages need dropout 0 (their first update checks the probability ratio "
                     "is exactly 1); set lora.dropout=0 or lora.stages to SFT/RM only.")


def increasing_ints(key: str, values) -> tuple[int, ...]:
  """`values` as a tuple, checked to be strictly increasing positive integers."""
  n = tuple(values)
  if not n or any(not isinstance(k, int) or k < 1 for k in n) or list(n) != sorted(set(n)):
    raise ValueError(f"{key} must be increasing positive integers, e.g. (1, 2, 4, 8); "
                     f"got {n!r}.")
  return n


def _check_train(key: str, t) -> None:
  for name in ("log_every", "keep_checkpoints"):
    if name in t and t[name] < 1:
      raise ValueError(f"{key}.{name} must be >= 1, got {t[name]}.")
  for name in ("eval_every", "checkpoint_every", "sample_every", "num_samples_shown"):
    if name in t and t[name] < 0:
      raise ValueError(f"{key}.{name} must be >= 0 (0: off), got {t[name]}.")


def _check_optim(key: str, o) -> None:
  if not 0 <= o.learning_rate < float("inf"):
    raise ValueError(f"{key}.learning_rate must be finite and >= 0, got {o.learning_rate!r}.")
  for name in ("warmup_steps", "decay_steps"):
    if o[name] < 0:
      raise ValueError(f"{key}.{name} must be >= 0, got {o[name]}.")
  _choice(f"{key}.schedule", o.schedule, SCHEDULES)
  if o.schedule != "constant" and o.decay_steps <= o.warmup_steps:
    raise ValueError(f"{key}.decay_steps ({o.decay_steps}) must exceed {key}.warmup_steps "
                     f"({o.warmup_steps}) with schedule {o.schedule!r}.")
  if o.grad_accum_steps < 1:
    raise ValueError(f"{key}.grad_accum_steps must be >= 1, got {o.grad_accum_steps}.")


def _check_batch(key: str, batch_size: int, accum: int, accum_key: str) -> None:
  _positive(key, batch_size)
  if batch_size % accum:
    raise ValueError(f"{key} ({batch_size}) does not divide into {accum_key}={accum} "
                     "micro-batches; choose a divisor.")


def _check_files(key: str, d) -> None:
  if d.train_path and not d.eval_path:
    raise ValueError(f"{key}.train_path is set but {key}.eval_path is not; give a held-out JSONL.")


def _check_sft(config) -> None:
  s = config.sft
  _choice("sft.data.loss_on", s.data.loss_on, ("completion", "all"))
  _check_files("sft.data", s.data)
  _check_batch("sft.data.batch_size", s.data.batch_size, s.optim.grad_accum_steps,
               "sft.optim.grad_accum_steps")
  _positive("sft.train.num_steps", s.train.num_steps)
  moe = config.model.moe
  if config.data.packing and moe.num_experts and not moe.dropless:
    # Capacity routing groups a row's tokens: packed examples would take each other's slots.
    raise ValueError("data.packing=True puts several examples in a row, and a capacity-routed "
                     "MoE (model.moe.dropless=False) makes a row's tokens compete for expert "
                     "slots, so examples would change each other's outputs; set "
                     "model.moe.dropless=True or data.packing=False.")


def _check_rm(config) -> None:
  r = config.rm
  _choice("rm.init", r.init, ("sft", "scratch"))
  _choice("rm.data.bad_pairs", r.data.bad_pairs, ("drop", "error"))
  _check_files("rm.data", r.data)
  k = r.data.samples_per_prompt
  if k < 2 or k % 2:
    raise ValueError(f"rm.data.samples_per_prompt must be even and >= 2, got {k}.")
  if r.data.annotator_temperature < 0:
    raise ValueError(f"rm.data.annotator_temperature must be >= 0, got "
                     f"{r.data.annotator_temperature}.")
  _check_batch("rm.data.batch_size", r.data.batch_size, r.optim.grad_accum_steps,
               "rm.optim.grad_accum_steps")
  _positive("rm.data.generation_batch_size", r.data.generation_batch_size)
  _positive("rm.train.num_steps", r.train.num_steps)


def _check_ppo(config) -> None:
  p = config.ppo
  _choice("ppo.reward", p.reward, ("model", "gold"))
  _choice("ppo.critic", p.critic, ("reward", "sft", "shared"))
  core.KL_ESTIMATORS.check(p.kl_estimator)
  advantages.ADVANTAGE_ESTIMATORS.check(p.advantage_estimator)
  if p.advantage_estimator not in PPO_ESTIMATORS:
    raise ValueError(f"ppo.advantage_estimator is {p.advantage_estimator!r}: it is registered "
                     "for critic-free training on groups of samples per prompt, which the PPO "
                     f"stage does not sample; choose one of {PPO_ESTIMATORS}.")
  losses.POLICY_LOSSES.check(p.policy_loss)
  losses.VALUE_LOSSES.check(p.value_loss)
  if p.reward == "gold" and (p.data.prompts_path or config.rm_checkpoint):
    raise ValueError("ppo.reward='gold' scores with a bundled task: unset ppo.data.prompts_path "
                     "and rm_checkpoint, or use ppo.reward='model'.")
  if p.reward == "gold" and p.critic == "reward":
    raise ValueError("ppo.critic='reward' starts the critic from the reward model, which "
                     "ppo.reward='gold' does not train; set --config.ppo.critic=sft or shared.")
  if p.data.prompts_path and not p.data.eval_prompts_path:
    raise ValueError("ppo.data.prompts_path is set but ppo.data.eval_prompts_path is not; give "
                     "held-out prompts for the final SFT-vs-PPO comparison.")
  bs = p.data.batch_size
  _positive("ppo.data.batch_size", bs)
  if bs % p.num_minibatches:
    raise ValueError(f"ppo.data.batch_size {bs} must divide by ppo.num_minibatches "
                     f"{p.num_minibatches}.")
  _check_batch("ppo.data.batch_size / ppo.num_minibatches", bs // p.num_minibatches,
               p.optim.grad_accum_steps, "ppo.optim.grad_accum_steps")
  for key in ("num_iterations", "ppo_epochs", "num_minibatches"):
    _positive(f"ppo.{key}", p[key])
  _check_rl_common(config, "ppo")


def _check_rl_common(config, stage: str) -> None:
  """What every policy-optimisation stage needs: sampling without filters, a dropless MoE."""
  s = config.sampling
  if s.top_k or s.top_p < 1 or s.min_new_tokens:
    # The sampler's log-probs are of the unfiltered softmax (what the training forward
    # recomputes); with filters the samples come from another distribution, so the "old
    # policy" would not be the sampling policy (TRL issue 6789).
    raise ValueError(f"{stage.upper()} samples from softmax(logits / sampling.temperature) and "
                     "trains on its log-probs: unset sampling.top_k, sampling.top_p and "
                     f"sampling.min_new_tokens (got {s.top_k}, {s.top_p}, {s.min_new_tokens}) "
                     "for RL.")
  if not config.sft_checkpoint and not config.init_from:
    _check_ppo_network(config.model.moe.num_experts, config.model.moe.dropless,
                       config.model.moe.router_jitter, "model.moe")


GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


def _check_group(config, stage: str) -> None:
  g = config[stage]
  _choice(f"{stage}.reward", g.reward, ("model", "gold"))
  _choice(f"{stage}.advantage_estimator", g.advantage_estimator, GROUP_ESTIMATORS)
  core.KL_ESTIMATORS.check(g.kl_estimator)
  if g.kl_loss_estimator not in core.KL_ESTIMATORS:
    raise ValueError(f"{stage}.kl_loss_estimator is {g.kl_loss_estimator!r}; choose one of "
                     f"{core.KL_ESTIMATORS.names()}.")
  losses.POLICY_LOSSES.check(g.policy_loss)
  _choice(f"{stage}.loss_aggregation", g.loss_aggregation, losses.AGGREGATIONS)
  if g.advantage_estimator in ("grpo", "rloo") and g.num_generations < 2:
    raise ValueError(f"{stage}.num_generations is {g.num_generations}: a group of one sample "
                     f"has no baseline ({g.advantage_estimator} advantages would all be 0); "
                     "use >= 2.")
  if g.reward == "gold" and (g.data.prompts_path or config.rm_checkpoint):
    raise ValueError(f"{stage}.reward='gold' scores with a bundled task: unset "
                     f"{stage}.data.prompts_path and rm_checkpoint, or use "
                     f"{stage}.reward='model'.")
  if g.data.prompts_path and not g.data.eval_prompts_path:
    raise ValueError(f"{stage}.data.prompts_path is set but {stage}.data.eval_prompts_path "
                     "is not.")
  for key in ("num_iterations", "ppo_epochs", "num_minibatches", "num_generations"):
    _positive(f"{stage}.{key}", g[key])
  _positive(f"{stage}.data.batch_size", g.data.batch_size)
  rows = g.data.batch_size * g.num_generations
  if rows % g.num_minibatches:
    raise ValueError(f"{stage}: {rows} responses per iteration (data.batch_size x "
                     f"num_generations) must divide by {stage}.num_minibatches "
                     f"{g.num_minibatches}.")
  _check_batch(f"{stage} minibatch", rows // g.num_minibatches, g.optim.grad_accum_steps,
               f"{stage}.optim.grad_accum_steps")
  _check_rl_common(config, stage)


def _check_dpo(config) -> None:
  d = config.dpo
  losses.PREFERENCE_LOSSES.check(d.loss_type)
  _choice("dpo.reward", d.reward, ("model", "none"))
  _check_files("dpo.data", d.data)
  _positive("dpo.beta", d.beta)
  if not 0 <= d.label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}.")
  if d.label_smoothing and d.loss_type != "dpo":
    raise ValueError(f"dpo.label_smoothing (cDPO) applies to dpo.loss_type='dpo', not "
                     f"{d.loss_type!r}; set it to 0.")
  if d.reward == "none" and config.rm_checkpoint:
    raise ValueError("dpo.reward='none' trains no RM, but rm_checkpoint is set; unset one.")
  _check_batch("dpo.data.batch_size", d.data.batch_size, d.optim.grad_accum_steps,
               "dpo.optim.grad_accum_steps")
  _positive("dpo.train.num_steps", d.train.num_steps)


def _check_best_of_n(config) -> None:
  b = config.best_of_n
  _choice("best_of_n.reward", b.reward, ("model", "gold"))
  increasing_ints("best_of_n.n", b.n)
  if b.reward == "gold" and (b.data.eval_prompts_path or config.rm_checkpoint):
    raise ValueError("best_of_n.reward='gold' ranks with a bundled task's gold reward: unset "
                     "best_of_n.data.eval_prompts_path and rm_checkpoint.")
  _positive("best_of_n.data.batch_size", b.data.batch_size)
  _positive("best_of_n.data.num_eval_prompts", b.data.num_eval_prompts)


def _check_ppo_network(num_experts, dropless, router_jitter, where: str) -> None:
  if num_experts and not (dropless and router_jitter == 0):
    # Capacity-based routing drops tokens depending on which tokens are routed together, so
    # one-token decode steps and the training forward would disagree: ratio != 1.
    raise ValueError(f"PPO with an MoE policy needs {where}.dropless=True and "
                     f"{where}.router_jitter=0 (sampler and training forward must agree); "
                     "train SFT with them, e.g. --config=configs/ppo.py:moe.")


def check_artifacts(config) -> None:
  """Checks the finished folders the config names (cheap: JSON files, no weights)."""
  for key, files in (("sft_checkpoint", ("model_config.json", "tokenizer.json")),
                     ("rm_checkpoint", ("model_config.json", "tokenizer.json",
                                        "normalization.json"))):
    path = config.get(key, "")
    for name in files if path else ():
      if not os.path.exists(os.path.join(path, name)):
        raise FileNotFoundError(f"{key}={path}: no {name}; expected the "
                                f"'{key.split('_')[0]}' folder of a finished run.")
  if any(s in config for s in config_lib.RL_STAGES) and config.sft_checkpoint:
    from rlhf_jax import artifacts  # pylint: disable=g-import-not-at-top
    m = artifacts.read_model_config(config.sft_checkpoint).moe
    _check_ppo_network(m.num_experts, m.dropless, m.router_jitter,
                       f"the policy in {config.sft_checkpoint}: model.moe")


def check_mesh(config, mesh) -> None:
  """Every batch of the run splits evenly over the mesh's batch shards."""
  from rlhf_jax import sharding  # pylint: disable=g-import-not-at-top
  shards = 1
  for axis in sharding.BATCH_AXES:
    shards *= mesh.shape[axis]
  sizes = [("sft.data.batch_size", config.sft.data.batch_size)]
  if "rm" in config:
    sizes += [("rm.data.batch_size", config.rm.data.batch_size),
              ("rm.data.generation_batch_size", config.rm.data.generation_batch_size)]
  for name in config_lib.GROUP_STAGES:
    if name in config:
      g = config[name]
      sizes += [(f"{name}.data.batch_size", g.data.batch_size),
                (f"{name} minibatch ({name}.data.batch_size x num_generations / "
                 f"num_minibatches / {name}.optim.grad_accum_steps)",
                 g.data.batch_size * g.num_generations // g.num_minibatches
                 // g.optim.grad_accum_steps)]
  if "dpo" in config:
    sizes += [("dpo.data.batch_size / dpo.optim.grad_accum_steps",
               config.dpo.data.batch_size // config.dpo.optim.grad_accum_steps)]
  if "best_of_n" in config:
    sizes += [("best_of_n.data.batch_size", config.best_of_n.data.batch_size)]
  if "ppo" in config:
    p = config.ppo
    sizes += [("ppo.data.batch_size", p.data.batch_size),
              ("ppo minibatch (ppo.data.batch_size / ppo.num_minibatches / "
               "ppo.optim.grad_accum_steps)",
               p.data.batch_size // p.num_minibatches // p.optim.grad_accum_steps)]
  for key, size in sizes:
    if size % shards:
      raise ValueError(f"{key} is {size}, which does not split over the {shards} batch shards "
                       f"of the mesh {dict(mesh.shape)}; choose a multiple of {shards} or "
                       "another mesh.")
