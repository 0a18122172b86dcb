"""The only place that chains stages, up to `config.stage`:

    SFT -> preference pairs -> RM -> PPO | GRPO | RLOO | REINFORCE++ | best-of-N
    SFT -> preference pairs (-> RM, for its score) -> DPO


Each stage takes artifacts (a policy, a reward function, a tokenizer, records) and the one
config, and returns artifacts; no stage module imports another. Before anything runs, the
config is validated (`validate.py`) and the artifacts named by `sft_checkpoint` /
`rm_checkpoint` are checked against it, so a PPO setting error is found before SFT trains.
A finished stage in the workdir (its `summary.json` written, its checkpoint at the
configured step) is reused and an interrupted one resumes, both only if made with the same
settings (`stage_settings.py`); `--config.retrain=<stage>` moves that stage's folder and the
later ones aside and trains them again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging

from rlhf_jax import artifacts, config as config_lib, sharding, stage_settings, validate
from rlhf_jax.data import records as records_lib, tasks
from rlhf_jax.stages import best_of_n, dpo, grpo, ppo, preferences, rm, sft


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]  # the last stage's final metrics
  policy: artifacts.Policy | None = None  # the SFT policy
  reward: artifacts.RewardFunction | None = None
  stages: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage -> its Result
  keep_states: bool = False
  last_stage: str = "ppo"

  def add(self, name: str, result) -> None:
    """Records a stage's result; its metrics become the pipeline's."""
    keep = self.keep_states or name == self.last_stage
    self.stages[name] = result if keep else dataclasses.replace(result, state=None)
    self.metrics = result.metrics


def run(config, workdir: str | None, mesh=None, keep_states: bool = False) -> Result:
  """Runs (or reuses) every stage up to `config.stage`.

  `out.stages` holds the Result of each stage run. Without `keep_states` the final train
  state of SFT and RM (their optimizer moments: twice the parameters) is dropped from it, so
  PPO does not run with it alive; tests keep it to compare parameters and steps.
  """
  validate.check(config)
  mesh = mesh or sharding.make_mesh(config.mesh)
  validate.check_mesh(config, mesh)
  validate.check_artifacts(config)
  if workdir and config.retrain:
    stages = config_lib.stages_of(config)
    stage_settings.move_aside(workdir, stages[stages.index(config.retrain):])
  out = Result({}, keep_states=keep_states, last_stage=config.stage)
  out.policy = _policy(config, workdir, mesh, out)
  if config.stage == "sft":
    return out
  rm_metrics = {}
  stage = config.stage
  if stage == "rm" or config[stage].reward == "model":
    out.reward, rm_metrics = _reward(config, workdir, mesh, out)
    if config.stage == "rm":
      return out
    if out.reward.tokenizer.vocab_size != out.policy.tokenizer.vocab_size:
      raise ValueError("the reward model and the policy use different tokenizers; train the "
                       "RM from this SFT run (same workdir) or pass matching checkpoints.")
  if _finished(config, workdir, stage, f"{stage} run", out):
    return out
  if stage == "dpo":
    prefs, task = preference_data(config, workdir, mesh, out.policy, "dpo")
    result = dpo.run(config, out.policy, out.reward, prefs, task, mesh, workdir, rm_metrics)
  elif stage == "best_of_n":
    result = best_of_n.run(config, out.policy, out.reward, mesh, workdir, rm_metrics)
  else:
    run_stage = ppo.run if stage == "ppo" else grpo.run
    result = run_stage(config, out.policy, out.reward, records_lib.load_prompts(config, stage),
                       mesh, workdir, rm_metrics)
  out.add(stage, result)
  return out


def _finished(config, workdir: str | None, stage: str, what: str, out: Result) -> str | None:
  """The folder of a finished `stage` to load instead of running it: `<stage>_checkpoint`,
  else `<workdir>/<stage>` if it holds a run of the configured length made with the same
  settings (other settings are an error); its saved metrics become the pipeline's. Else
  None, and the workdir folder is claimed for the run (`_claim`)."""
  path = config.get(f"{stage}_checkpoint", "")
  own = artifacts.stage_dir(workdir, stage)
  num_steps = config[stage].num_iterations if stage in config_lib.RL_STAGES else (
      config[stage].train.get("num_steps"))  # best-of-N trains nothing: its summary suffices
  if not path and artifacts.finished(own, num_steps):
    stage_settings.check(own, config, stage)
    path = own
  if not path:
    _claim(own, config, stage)
    return None
  logging.info("[pipeline] reusing the finished %s in %s", what, path)
  out.metrics = artifacts.read_summary(path)
  return path


def _claim(out_dir: str | None, config, stage: str) -> None:
  """Before a stage (re)starts in `out_dir`: an interrupted run there must have been made with
  the same settings (it is resumed); a new one records them."""
  if not out_dir:
    return
  if os.path.exists(os.path.join(out_dir, stage_settings.FILE)):
    stage_settings.check(out_dir, config, stage)
  elif jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    stage_settings.save(out_dir, config, stage)


def _policy(config, workdir, mesh, out: Result) -> artifacts.Policy:
  """The SFT policy: `sft_checkpoint`, else the finished run in `<workdir>/sft`, else trained
  (or resumed) now."""
  path = _finished(config, workdir, "sft", "SFT policy", out)
  if path:
    return artifacts.load_policy(path, mesh)
  result = sft.run(config, records_lib.load_sft_data(config, workdir), mesh, workdir)
  out.add("sft", result)
  return result.policy


def _reward(config, workdir, mesh, out: Result):
  """(normalised RM, its metrics): `rm_checkpoint`, else the finished run in `<workdir>/rm`,
  else trained (or resumed) now on user pairs or pairs generated from the SFT policy."""
  path = _finished(config, workdir, "rm", "reward model", out)
  if path:
    return artifacts.load_reward_model(path, mesh), out.metrics
  prefs, task = preference_data(config, workdir, mesh, out.policy, "rm")
  result = rm.run(config, out.policy, prefs, task, mesh, workdir)
  out.add("rm", result)
  return result.reward, result.metrics


def preference_data(config, workdir, mesh, policy: artifacts.Policy, stage: str = "rm"):
  """(PreferenceData, task or None) for `stage`: its own preference JSONL, else the RM
  stage's files, else pairs generated from the SFT policy (reused from `<workdir>/rm`)."""
  for name in (stage, "rm"):
    if records_lib.uses_files(config[name].data):
      train, evals, names, _ = records_lib.load_records(config, name, "preference", "")
      return preferences.PreferenceData(train, evals, names), None
  task = tasks.get_task(config.data.task)
  return preferences.run(config, task, policy, mesh, workdir), task
