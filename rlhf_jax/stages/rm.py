"""Reward model: Bradley-Terry on preference pairs, then normalised on SFT samples.

    loss = -mean log sigmoid(r_chosen - r_rejected - margin) + c * mean((r_chosen + r_rejected)^2)

The score r is the reward head read at the last non-pad token of prompt + response; an MoE
trunk adds its auxiliary losses (`models/moe.py`) to the loss.
After training, a gain and bias are fitted so that scores of SFT-policy samples have mean 0
and std 1 (as in lm-human-preferences); they are stored in `<workdir>/rm/normalization.json`
and applied by `artifacts.RewardFunction.score` whenever the RM scores samples for PPO.
`run` is the stage: given the SFT policy and preference pairs, it returns the normalised RM.
Reads `config.rm` and the shared sections.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import artifacts, sampling, sharding
from rlhf_jax.data import batching
from rlhf_jax.models import RewardModel, lora, moe
from rlhf_jax.train import optim, runner as runner_lib, state as state_lib


def pair_scores(model: RewardModel, batch):
  """(r_chosen [B], r_rejected [B]) from one forward over the 2B sequences."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
  r_2B = model(tokens, mask)
  return jnp.split(r_2B, 2)


def rm_loss(model: RewardModel, batch, centering_coef: float = 0.0):
  r_c, r_r = pair_scores(model, batch)
  diff = r_c - r_r
  loss = -jnp.mean(jax.nn.log_sigmoid(diff - batch["margin"]))
  if centering_coef:
    loss += centering_coef * jnp.mean((r_c + r_r) ** 2)
  rewards = jnp.concatenate([r_c, r_r])
  aux, aux_metrics = moe.aux_loss(model)  # MoE trunk: load balancing + router z-loss
  return loss + aux, {"accuracy": jnp.mean(diff > 0), "margin": jnp.mean(diff),
                      "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                      **aux_metrics}


@dataclasses.dataclass
class Result:
  reward: artifacts.RewardFunction  # the trained, normalised RM, on the mesh
  metrics: dict[str, float]
  state: Any  # the final TrainState


def run(config: ml_collections.ConfigDict, policy: artifacts.Policy, prefs, task, mesh,
        workdir: str | None) -> Result:
  """Trains the RM on `prefs` (`train`, `eval` record lists, `sources`); `task` (or None)
  gives the gold reward for `eval_gold_agreement`."""
  r, tok = config.rm, policy.tokenizer
  arrays, counts = _arrays(config, prefs, tok)
  graphdef, params = sharding.init_sharded(
      lambda: RewardModel(policy.model_config, nnx.Rngs(params=config.seed)), mesh)
  if r.init == "sft":  # trunk from the SFT policy; the reward head stays freshly initialised
    # (create_train_state below copies it, so donating the RM state never frees the policy's;
    # with LoRA it stays the frozen base, never donated.)
    params["trunk"] = policy.params["trunk"]
  dense_graphdef, adapters = graphdef, lora.for_stage(config, "rm")
  if adapters.enabled:  # adapters on the frozen trunk; the reward head trains fully
    lora_cfg = dataclasses.replace(policy.model_config, lora=adapters)
    graphdef, params = lora.attach(lambda: RewardModel(lora_cfg, nnx.Rngs(0)), params,
                                   config.seed, mesh)
  tx = optim.make_optimizer(r.optim)
  state, shardings = state_lib.create_train_state(
      params, tx, mesh, trainable=lora.is_trainable if adapters.enabled else None)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in arrays["train"].items()}
  loss_fn = functools.partial(rm_loss, centering_coef=r.loss.centering_coef)
  step = state_lib.make_train_step(graphdef, loss_fn, tx, mesh, shardings, batch_sh,
                                   r.optim.grad_accum_steps,
                                   dropout_seed=config.seed if adapters.dropout else None)
  gold = None
  if task is not None:
    gold = [(task.gold_reward(x["prompt"], x["chosen"]), task.gold_reward(x["prompt"], x["rejected"]))
            for x in prefs.eval if x["chosen"] != x["rejected"]]
  evaluate = _make_evaluator(graphdef, arrays["eval"], gold, r.data.batch_size, mesh,
                             prefs.sources["eval"], counts["eval"])
  batches = batching.EpochIterator(arrays["train"], r.data.batch_size, config.seed,
                                   *sharding.process_block(mesh),
                                   source=f"{prefs.sources['train']} (pairs kept)",
                                   batch_key="rm.data.batch_size")
  runner = runner_lib.StageRunner("rm", workdir, runner_lib.LoopConfig.from_section(r.train))
  state, metrics = runner.run(lambda i, st, b: step(st, b), state, batches,
                              shard=lambda b: sharding.shard_batch(b, mesh), eval_fn=evaluate)
  norm = _normalize(config, policy, graphdef, state.params, prefs.train, mesh)
  metrics.update({f"normalization/{k}": v for k, v in norm.items()})
  for split in ("train", "eval"):
    for k, v in dataclasses.asdict(counts[split]).items():
      metrics[f"data/{split}_{k}"] = v
  runner.writer.write(int(state.step),
                      {k: v for k, v in metrics.items() if k.startswith("normalization")})
  runner.close()
  out_dir = artifacts.stage_dir(workdir, "rm")
  if out_dir and jax.process_index() == 0:
    if adapters.enabled:  # before summary.json (save_network), which marks the folder done
      base = {"seed": config.seed}
      if r.init == "sft":
        base["trunk_from"] = artifacts.sft_folder(config, workdir)
      artifacts.write_lora(out_dir, adapters, base)
    artifacts.save_network(out_dir, policy.model_config, tok, metrics, normalization=norm)
  params = artifacts.merged(state.params, adapters) if adapters.enabled else state.params
  reward = artifacts.RewardFunction(dense_graphdef, params, norm["gain"], norm["bias"],
                                    policy.model_config, tok)
  return Result(reward, metrics, state)


def _arrays(config, prefs, tok):
  d, r = config.data, config.rm.data
  arrays, counts = {}, {}
  for split, recs in (("train", prefs.train), ("eval", prefs.eval)):
    counts[split] = batching.PreferenceCounts()
    arrays[split] = batching.preference_arrays(recs, tok, d.max_prompt_len, d.max_completion_len,
                                               counts[split], r.bad_pairs, prefs.sources[split])
    logging.info("[rm] %s pairs from %s: %s", split, prefs.sources[split], counts[split])
  return arrays, counts


def _normalize(config, policy, graphdef, params, train_recs, mesh) -> dict[str, float]:
  """Gain and bias that give scores of fresh SFT samples (for the training prompts) mean 0
  and std 1, with the raw statistics they came from. The samples are scored as ids in PPO's
  rollout layout, so the normalisation holds for exactly what PPO scores."""
  d, n = config.data, config.rm.normalize.num_samples
  prompts = [x["prompt"] for x in train_recs][:n]
  prompts = (prompts * (n // max(len(prompts), 1) + 1))[:n]
  tok, bs = policy.tokenizer, config.rm.data.generation_batch_size
  sampler = sampling.make_sampler(policy.graphdef,
                                  sampling.from_config(config.sampling, d.max_completion_len),
                                  tok.eos_id, tok.pad_id)
  samples = sampling.sample_prompts(sampler, policy.params, tok, prompts, mesh,
                                    d.max_prompt_len, bs, jax.random.PRNGKey(config.seed + 2))
  # The sampled ids as PPO scores them (prompt + response, no decode / re-encode).
  raw = artifacts.sequence_scores(artifacts.raw_score_fn(graphdef), params, samples.seq,
                                  samples.seq_mask, bs, mesh)
  gain, bias = normalization(raw)
  logging.info("[rm] normalisation on %d SFT samples: raw mean %.3f std %.3f -> gain %.3f "
               "bias %.3f", len(raw), raw.mean(), raw.std(), gain, bias)
  return {"gain": gain, "bias": bias, "raw_mean": float(raw.mean()),
          "raw_std": float(raw.std()), "num_samples": len(raw)}


def normalization(raw_scores: np.ndarray) -> tuple[float, float]:
  """(gain, bias) with gain * raw + bias of mean 0 and std 1 over `raw_scores`."""
  raw_scores = np.asarray(raw_scores, np.float64)
  std = raw_scores.std()
  if not np.isfinite(std) or std < 1e-8:
    raise FloatingPointError(f"RM scores of SFT samples have std {std}; cannot normalise (is the "
                             "reward model constant?).")
  return float(1.0 / std), float(-raw_scores.mean() / std)


def _make_evaluator(graphdef, eval_arrays, gold, bs, mesh, source: str = "eval pairs",
                    counts: batching.PreferenceCounts | None = None):
  """Held-out accuracy against the labels and, on bundled tasks, against the gold order.
  `source` and `counts`: where the held-out pairs came from and what `preference_arrays`
  dropped of them, for the error when none are left."""
  scores = jax.jit(lambda p, b: pair_scores(artifacts.eval_model(graphdef, p), b))
  n = len(eval_arrays["margin"])
  if n == 0:
    raise ValueError(_no_eval_pairs_message(source, counts or batching.PreferenceCounts()))

  def evaluate(state):
    outs = sharding.for_each_batch(lambda _, b: scores(state.params, b), eval_arrays, bs, mesh)
    diff = (np.concatenate([c for c, _ in outs]) - np.concatenate([r for _, r in outs]))[:n]
    metrics = {"eval_accuracy": float(np.mean(diff > 0)), "eval_margin": float(diff.mean()),
               "eval_loss": float(np.mean(np.logaddexp(0.0, -(diff - eval_arrays["margin"]))))}
    if gold:
      g = np.asarray(gold)
      untied = g[:, 0] != g[:, 1]
      agree = np.sign(diff[untied]) == np.sign(g[untied, 0] - g[untied, 1])
      metrics["eval_gold_agreement"] = float(np.mean(agree))
    return metrics

  return evaluate


def _no_eval_pairs_message(source: str, counts: batching.PreferenceCounts) -> str:
  """One line: which file gave no held-out pairs, and why (what was dropped)."""
  read = counts.kept + counts.identical
  why = ("it holds no pairs" if read == 0 else
         f"{counts.identical} of {read} pairs dropped as identical (chosen == rejected), "
         f"{counts.truncated} truncated, none kept")
  return (f"rm: no held-out preference pairs left after dropping bad pairs from {source}: {why}; "
          "the RM's evaluation needs held-out pairs whose chosen and rejected differ.")
