"""Best-of-N sampling (Stiennon et al. 2020; Nakano et al. 2021): nothing is trained.

For each held-out prompt, max(N) responses are sampled from the SFT policy in one call
(the prompt is prefilled once and its KV cache repeated, `SamplingConfig.num_samples`).
Every response is scored by the normalised RM and, on a bundled task, by the gold reward.
For each N of `best_of_n.n` the response kept is the argmax of the ranking reward
(`best_of_n.reward`: "model" = the RM, "gold" = the oracle's best-of-N) among the prompt's
FIRST N samples, so N = 1 is the plain SFT sample and one sampling run gives every N. The
KL of the best-of-N policy to the SFT policy is the analytic

    KL(N) = log N - (N - 1) / N   nats (`rl.core.best_of_n_kl`)

exact for rewards without ties, an upper bound with ties (Beirami et al. 2024).

Outputs: a metrics row per N (step N) with `best_of_n/{N}/kl`, `best_of_n/{N}/gold_reward`
(with a task) and `best_of_n/{N}/rm_score` (with an RM); then the held-out summary of every
stage: `final/{sft,best_of_n}_{gold_reward,rm_score}` (N = 1 vs the largest N), `final/kl`,
`rm/eval_accuracy`; the plot `<workdir>/best_of_n/best_of_n.png` (reward vs KL), and
`summary.json` last (it marks the stage finished).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from rlhf_jax import artifacts, sampling, sharding
from rlhf_jax.data import batching, sources, tasks
from rlhf_jax.fileio import write_json
from rlhf_jax.rl import core
from rlhf_jax.train import metrics as metrics_lib

STAGE = "best_of_n"
PLOT = "best_of_n.png"


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]
  state: Any = None  # nothing is trained


def held_out_prompts(config) -> tuple[list[str], Any]:
  """(prompts, task): `best_of_n.data.eval_prompts_path` (task None: no gold reward), else
  the bundled task's eval prompts."""
  d = config.best_of_n.data
  if d.eval_prompts_path:
    records = sources.read_jsonl(d.eval_prompts_path, "prompt")
    return [r["prompt"] for r in records[:d.num_eval_prompts]], None
  task = tasks.get_task(config.data.task)
  return [r["prompt"] for r in task.prompts(d.num_eval_prompts, config.seed, "eval")], task


def best_indices(ranking_PxG: np.ndarray, n: int) -> np.ndarray:
  """[P] column of each prompt's best response among its first `n` (ties: the first)."""
  return np.argmax(ranking_PxG[:, :n], axis=1)


def sample_groups(config, policy: artifacts.Policy, prompts: list[str], mesh,
                  num_samples: int, batch_size: int) -> sampling.Samples:
  """`num_samples` responses per prompt (rows P * G, a prompt's G consecutive), in the
  rollout layout; `batch_size` prompts per sampler call, the batch at prompt offset i drawn
  with `fold_in(PRNGKey(seed), i)`."""
  tok, g = policy.tokenizer, num_samples
  base = sampling.from_config(config.sampling, config.data.max_completion_len)
  sampler = sampling.make_sampler(policy.graphdef, dataclasses.replace(base, num_samples=g),
                                  tok.eos_id, tok.pad_id)
  arrays = batching.prompt_arrays(prompts, tok, config.data.max_prompt_len)
  rng = jax.random.PRNGKey(config.seed)

  def sample(start, b):
    out = sampler(policy.params, b["tokens"], b["mask"], jax.random.fold_in(rng, start))
    return {"tokens": out["tokens"], "mask": out["mask"]}

  outs = sharding.for_each_batch(sample, arrays, batch_size, mesh)
  rows = len(prompts) * g  # a last partial batch wrapped around: its extra rows go
  tokens, mask = (np.concatenate([o[k] for o in outs])[:rows] for k in ("tokens", "mask"))
  return sampling.Samples(np.repeat(arrays["tokens"], g, 0), np.repeat(arrays["mask"], g, 0),
                          tokens, mask, tok)


def score_groups(samples: sampling.Samples, prompts: list[str], reward, task, mesh,
                 batch_rows: int) -> dict[str, np.ndarray]:
  """{"rm_score" (with an RM), "gold_reward" (with a task)} -> [P, G] per sample."""
  p = len(prompts)
  g = len(samples.tokens) // p
  out = {}
  if reward is not None:
    scores = artifacts.sequence_scores(jax.jit(reward.score), reward.params, samples.seq,
                                       samples.seq_mask, batch_rows, mesh)
    out["rm_score"] = scores.reshape(p, g)
  if task is not None:
    out["gold_reward"] = np.array([task.gold_reward(prompts[i // g], text)
                                   for i, text in enumerate(samples.texts)],
                                  np.float32).reshape(p, g)
  return out


def per_n_metrics(ranking_PxG: np.ndarray, scores: dict[str, np.ndarray],
                  ns) -> dict[int, dict[str, float]]:
  """N -> `best_of_n/{N}/{kl, <score>}`: the mean score of the responses kept."""
  rows = np.arange(len(ranking_PxG))
  out = {}
  for n in ns:
    best_P = best_indices(ranking_PxG, n)
    out[n] = {f"best_of_n/{n}/kl": core.best_of_n_kl(n)}
    for name, s_PxG in scores.items():
      out[n][f"best_of_n/{n}/{name}"] = float(np.mean(s_PxG[rows, best_P], dtype=np.float64))
  return out


def summarize(per_n: dict[int, dict[str, float]], scores: dict[str, np.ndarray],
              rm_metrics: dict | None) -> dict[str, float]:
  """The held-out summary keys of every stage: SFT = the first sample (N = 1), the stage =
  the largest N."""
  big = max(per_n)
  out = {"final/kl": per_n[big][f"best_of_n/{big}/kl"]}
  for name, s_PxG in scores.items():
    out[f"final/sft_{name}"] = float(np.mean(s_PxG[:, 0], dtype=np.float64))
    out[f"final/best_of_n_{name}"] = per_n[big][f"best_of_n/{big}/{name}"]
  for key in ("eval_accuracy", "eval_gold_agreement"):
    if key in (rm_metrics or {}):
      out[f"rm/{key}"] = float(rm_metrics[key])
  return out


def log_results(per_n, names, prompts, texts, ranking_PxG, shown: int) -> None:
  """The table of N, KL and mean scores; `shown` prompts with their best and worst sample
  of the largest N by the ranking reward."""
  logging.info("[best_of_n] %6s %9s %s", "N", "KL(nats)", " ".join(f"{k:>12}" for k in names))
  for n, m in per_n.items():
    logging.info("[best_of_n] %6d %9.4f %s", n, m[f"best_of_n/{n}/kl"],
                 " ".join(f"{m[f'best_of_n/{n}/{k}']:12.4f}" for k in names))
  g = ranking_PxG.shape[1]
  for i in range(min(shown, len(prompts))):
    best, worst = np.argmax(ranking_PxG[i]), np.argmin(ranking_PxG[i])
    logging.info("[best_of_n] sample | %s | best (%.3f): %s | worst (%.3f): %s", prompts[i],
                 ranking_PxG[i, best], texts[i * g + best], ranking_PxG[i, worst],
                 texts[i * g + worst])


def plot(path: str, per_n, names, ranked_by: str) -> None:
  """Each mean score vs the analytic KL, one panel per score, points labelled by N."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("[best_of_n] no plot: matplotlib is not installed (pip install matplotlib)")
    return
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
  kl = [m[f"best_of_n/{n}/kl"] for n, m in per_n.items()]
  for ax, name in zip(axes[0], names):
    y = [m[f"best_of_n/{n}/{name}"] for n, m in per_n.items()]
    ax.plot(kl, y, marker="o")
    for n, xi, yi in zip(per_n, kl, y):
      ax.annotate(f"N={n}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set(xlabel="KL to the SFT policy (nats)", ylabel=name.replace("_", " "))
    ax.margins(0.15)  # room for the labels of the end points
    ax.grid(alpha=0.3)
  fig.suptitle(f"best-of-N of the SFT policy, ranked by the {ranked_by}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, policy: artifacts.Policy, reward, mesh, workdir: str | None,
        rm_metrics: dict | None = None) -> Result:
  """Best-of-N of the SFT `policy` for every N of `best_of_n.n`, ranked by `reward` (the
  normalised RM) or, with `best_of_n.reward == "gold"`, by the task's gold reward."""
  b = config.best_of_n
  ns, max_n = tuple(int(n) for n in b.n), max(b.n)
  if config.sampling.temperature == 0:
    logging.warning("[best_of_n] sampling.temperature is 0: the N samples are all the same")
  prompts, task = held_out_prompts(config)
  t0 = time.perf_counter()
  samples = sample_groups(config, policy, prompts, mesh, max_n, b.data.batch_size)
  t_sample = time.perf_counter() - t0
  scores = score_groups(samples, prompts, reward, task, mesh, b.data.batch_size * max_n)
  ranking_PxG = scores["rm_score" if b.reward == "model" else "gold_reward"]
  per_n = per_n_metrics(ranking_PxG, scores, ns)
  names = sorted(scores)
  log_results(per_n, names, prompts, samples.texts, ranking_PxG, b.train.num_samples_shown)
  summary = summarize(per_n, scores, rm_metrics)
  summary["time/sampling_s"] = t_sample

  writer = metrics_lib.MetricsWriter(workdir, STAGE)
  writer.drop_after(0)  # the rows of an interrupted earlier run of this stage
  for n, m in per_n.items():
    writer.write(n, m)
  writer.write(max_n, summary)
  writer.close()
  final = {k: v for m in per_n.values() for k, v in m.items()} | summary
  out_dir = artifacts.stage_dir(workdir, STAGE)
  if out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    plot(os.path.join(out_dir, PLOT), per_n, names,
         "RM" if b.reward == "model" else "gold reward")
    write_json(os.path.join(out_dir, artifacts.SUMMARY), final)  # last: marks it finished
  for k, v in sorted(summary.items()):
    logging.info("[best_of_n] summary %s = %.4f", k, v)
  return Result(final)
