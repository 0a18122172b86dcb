"""What the policy-optimisation stages (PPO, GRPO) share around their iteration: the train
prompts as resumable batches, the task's gold reward of sampled texts, and the end of the
stage: the held-out summary (gold reward and RM score of the start policy vs the trained one,
on the same held-out prompts and keys), written to metrics and `summary.json`.

The RM scores the sampled ids in the rollout layout (prompt + response), as in training; the
gold reward reads the decoded texts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from rlhf_jax import artifacts, sampling, sharding
from rlhf_jax.data import batching
from rlhf_jax.models.heads import response_logits
from rlhf_jax.rl import core
from rlhf_jax.fileio import write_json


def prompt_batches(config, stage: str, prompts, tok, mesh) -> batching.EpochIterator:
  """The train prompts of `stage` as batches of `tokens`, `mask` and `index` (into
  `prompts.train`), deterministic and resumable."""
  arrays = batching.prompt_arrays(prompts.train, tok, config.data.max_prompt_len)
  arrays["index"] = np.arange(len(prompts.train))
  return batching.EpochIterator(arrays, config[stage].data.batch_size, config.seed,
                                *sharding.process_block(mesh),
                                source=prompts.sources.get("train", "prompts"),
                                batch_key=f"{stage}.data.batch_size")


def gold_fn(prompts):
  """`(index, texts) -> [B] float32`: the bundled task's gold reward of sampled texts for the
  train prompts at `index`; None for prompt files (no gold reward)."""
  task, train = prompts.task, prompts.train
  if task is None:
    return None
  return lambda index, texts: np.array(
      [task.gold_reward(train[i], t) for i, t in zip(index, texts)], np.float32)


def finish(config, stage: str, runner, last: dict[str, float], summary: dict[str, float],
           rm_metrics: dict | None, workdir: str | None) -> dict[str, float]:
  """Completes `summary` (final KL, the RM's held-out accuracy), writes it as the stage's last
  metrics row and, with the last iteration's metrics, as its `summary.json` (what a rerun
  reports); closes the runner; returns the final metrics."""
  summary.setdefault("final/kl", last.get("objective/kl", float("nan")))
  for key in ("eval_accuracy", "eval_gold_agreement"):
    if key in (rm_metrics or {}):
      summary[f"rm/{key}"] = rm_metrics[key]
  runner.writer.write(runner.loop.num_steps, summary)
  runner.close()
  final = {**last, **summary}
  out_dir = artifacts.stage_dir(workdir, stage)
  if out_dir and jax.process_index() == 0:
    write_json(f"{out_dir}/{artifacts.SUMMARY}", final)
  for k, v in sorted(summary.items()):
    logging.info("[%s] summary %s = %.4f", stage, k, v)
  return final


@dataclasses.dataclass
class Monitor:
  """An ensemble of RMs watched, not optimised (`monitor(ensemble)`): `scores(params, tokens,
  mask) -> [K, B]`, jitted once."""
  params: Any
  scores: Callable


def monitor(ensemble) -> Monitor | None:
  """A `Monitor` of a `lab.ensemble.RewardEnsemble` (None passes through)."""
  return None if ensemble is None else Monitor(ensemble.params, jax.jit(ensemble.scores))


def _mean_se(x: np.ndarray) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def held_out_scores(config, policy: artifacts.Policy, params, reward, sampler, score_fn,
                    prompts, mesh, batch_size: int, watch: Monitor | None = None):
  """(samples, {"rm_score", "gold_reward", "gold_reward_se"}) of `params` on the held-out
  prompts, always drawn with the same key (`seed + 7`), so the start policy, the trained
  one and every periodic evaluation are compared on the same draws. `sampler`: one sample
  per prompt; `score_fn`: the jitted normalised RM score (None without an RM); the RM keys
  only with an RM, the gold keys only with a bundled task. With `watch`, also
  "ensemble_std" (the members' disagreement, `rl/ensembles.disagreement`), "ensemble_mean"
  (their mean score) and their SEs."""
  samples = sampling.sample_prompts(sampler, params, policy.tokenizer, prompts.eval, mesh,
                                    config.data.max_prompt_len, batch_size,
                                    jax.random.PRNGKey(config.seed + 7))
  out = {}
  if reward is not None:
    scores = artifacts.sequence_scores(score_fn, reward.params, samples.seq, samples.seq_mask,
                                       batch_size, mesh)
    out["rm_score"] = float(np.mean(scores, dtype=np.float64))
  if watch is not None:
    scores_KxN = artifacts.sequence_scores(watch.scores, watch.params, samples.seq,
                                           samples.seq_mask, batch_size, mesh)
    for key, per_sample in (("ensemble_std", scores_KxN.std(axis=0)),
                            ("ensemble_mean", scores_KxN.mean(axis=0))):
      out[key], out[f"{key}_se"] = _mean_se(per_sample)
  if prompts.task is not None:
    gold = [prompts.task.gold_reward(q, a) for q, a in zip(prompts.eval, samples.texts)]
    out["gold_reward"], out["gold_reward_se"] = _mean_se(gold)
  return samples, out


def held_out_summary(config, stage: str, policy: artifacts.Policy, trained_params, reward,
                     sampler, score_fn, prompts, mesh, batch_size: int,
                     with_kl: bool = False, watch: Monitor | None = None) -> dict[str, float]:
  """`final/{sft,<stage>}_{gold_reward,rm_score}` (`held_out_scores` of both policies, with
  the gold SE; with `watch` also `_ensemble_{std,mean}` and their SEs), and with `with_kl` the
  trained policy's `final/kl` on its own held-out samples (`samples_kl`; for a stage whose
  training does not measure the KL, e.g. DPO)."""
  out = {}
  for name, params in (("sft", policy.params), (stage, trained_params)):
    samples, scores = held_out_scores(config, policy, params, reward, sampler, score_fn,
                                      prompts, mesh, batch_size, watch)
    for key in ("rm_score", "gold_reward", "gold_reward_se", "ensemble_std", "ensemble_std_se",
                "ensemble_mean", "ensemble_mean_se"):
      if key in scores:
        out[f"final/{name}_{key}"] = scores[key]
  if with_kl:
    out["final/kl"] = samples_kl(config, policy, trained_params, samples, mesh, batch_size)
  return out


def _response_kl(graphdef, params, ref_params, seq, seq_mask, n: int, temperature: float):
  pi = response_logits(artifacts.eval_model(graphdef, params), seq, seq_mask, n)
  ref = response_logits(artifacts.eval_model(graphdef, ref_params), seq, seq_mask, n)
  return (core.token_kl_exact(pi, ref, temperature) * seq_mask[:, -n:]).sum(axis=1)


def samples_kl(config, policy: artifacts.Policy, params, samples, mesh, batch_size: int):
  """KL(pi || ref) in nats per response on pi's own `samples`, `ref` the SFT policy: the mean
  over samples of the exact per-position KL summed over the response (`core.token_kl_exact`,
  Rao-Blackwellised over the vocabulary). Sampled-token estimators were too noisy for the
  lab's curves: k1 gave negative means near the reference, and k3's exp(log ref - log pi)
  term let one token the policy had abandoned swing a 128-prompt estimate from 6 to 17 nats
  between neighbouring evaluations."""
  n = samples.tokens.shape[1]
  kl_fn = jax.jit(functools.partial(_response_kl, policy.graphdef, n=n,
                                    temperature=config.sampling.temperature))
  kl = sharding.for_each_batch(
      lambda _, b: kl_fn(params, policy.params, b["seq"], b["seq_mask"]),
      {"seq": samples.seq, "seq_mask": samples.seq_mask}, batch_size, mesh)
  return float(np.mean(np.concatenate(kl)[:len(samples.seq)], dtype=np.float64))


def periodic_eval(config, policy: artifacts.Policy, reward, sampler, score_fn, prompts, mesh,
                  batch_size: int, params_of=lambda state: state.params,
                  watch: Monitor | None = None):
  """`state -> metrics`, the held-out evaluation an RL stage runs every `train.eval_every`
  iterations: `eval/gold_reward` (bundled tasks), `eval/rm_score` (with an RM), `eval/kl`
  (`samples_kl`) and with `watch` `eval/ensemble_{std,mean}` of the current policy's samples
  of the held-out prompts, with the same key every time, so the points trace one curve (the
  gold-reward lab's RL curves)."""
  def evaluate(state) -> dict[str, float]:
    params = params_of(state)
    samples, scores = held_out_scores(config, policy, params, reward, sampler, score_fn,
                                      prompts, mesh, batch_size, watch)
    return {"eval/kl": samples_kl(config, policy, params, samples, mesh, batch_size),
            **{f"eval/{k}": v for k, v in scores.items()}}

  return evaluate
