"""Reward model: Bradley-Terry on preference pairs, then normalised on SFT samples.

    loss = -mean log sigmoid(r_chosen - r_rejected - margin) + c * mean((r_chosen + r_rejected)^2)

The score r is the reward head read at the last non-pad token of prompt + response; an MoE
trunk adds its auxiliary losses (`models/moe.py`) to the loss.
After training, a gain and bias are fitted so that scores of SFT-policy samples have mean 0
and std 1 (as in lm-human-preferences); they are stored in `<workdir>/rm/normalization.json`
and applied by `load_reward_model(...).score` whenever the RM scores text for PPO.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import preferences, sharding, sft
from rlhf_jax.fileio import write_json
from rlhf_jax.data import batching, records as records_lib, sources, tasks, tokenizer as tokenizer_lib
from rlhf_jax.models import RewardModel, TransformerConfig, moe
from rlhf_jax.train import checkpoint, loop, optim, state as state_lib


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


def _eval_model(graphdef, params) -> RewardModel:
  """The RM for scoring: MoE layers in eval mode (eval capacity factor, no router jitter)."""
  model = nnx.merge(graphdef, params)
  model.eval()
  return model


@dataclasses.dataclass
class RewardFunction:
  """A trained, normalised RM: `score(params, tokens, mask) = gain * raw + bias`."""
  graphdef: Any
  params: Any
  gain: float
  bias: float
  model_config: TransformerConfig
  tokenizer: tokenizer_lib.Tokenizer

  def score(self, params, tokens_BxT, mask_BxT):
    return self.gain * _eval_model(self.graphdef, params)(tokens_BxT, mask_BxT) + self.bias


def load_reward_model(rm_dir: str, mesh) -> RewardFunction:
  """The final RM of `<rm_dir>` (a workdir's `rm` folder) with its normalisation."""
  graphdef, params, model_cfg, tok = sft.load_network(
      rm_dir, RewardModel, mesh, extra_files=("normalization.json",),
      hint="expected the 'rm' folder of a finished RM run (e.g. --config.rm_checkpoint=workdir/rm).")
  with open(os.path.join(rm_dir, "normalization.json")) as f:
    norm = json.load(f)
  return RewardFunction(graphdef, params, norm["gain"], norm["bias"], model_cfg, tok)


def ensure_reward_model(rm_config: ml_collections.ConfigDict, workdir: str | None, mesh,
                        checkpoint_path: str = "") -> tuple[RewardFunction, dict[str, float]]:
  """(normalised RM, its final metrics): from `checkpoint_path` if given, else the finished
  RM run in `<workdir>/rm`, else trains (or resumes) it now."""
  rm_dir = checkpoint_path or sft.stage_dir(workdir, "rm")
  summary = os.path.join(rm_dir, "summary.json") if rm_dir else ""
  if checkpoint_path or (summary and os.path.exists(summary)):
    logging.info("[rm] reusing the finished reward model in %s", rm_dir)
    metrics = {}
    if os.path.exists(summary):
      with open(summary) as f:
        metrics = json.load(f)
    return load_reward_model(rm_dir, mesh), metrics
  result = run(rm_config, workdir)
  reward = result["reward"]
  reward.params = jax.device_put(reward.params, sharding.param_shardings(reward.params, mesh))
  return reward, result["metrics"]


def _preference_records(config, workdir, task, policy, mesh):
  """(train, eval, source names): user files, or generated for the bundled task."""
  d = config.data
  if d.train_path or d.tfds_name:
    train, evals, names, _ = records_lib.load_records(config, "preference", "")
    return train, evals, names
  if not workdir:
    raise ValueError("the RM stage needs a workdir to write generated preferences into.")
  out = {}
  os.makedirs(os.path.join(workdir, "rm"), exist_ok=True)
  for split, n in (("train", d.num_train_prompts), ("eval", d.num_eval_prompts)):
    path = os.path.join(workdir, "rm", f"preferences_{split}.jsonl")
    # Generation is deterministic, so a rerun reuses the file, but only if it was made with
    # the same settings: stale pairs from other settings would silently train the wrong RM.
    settings = _generation_settings(config, split, n)
    settings_path = path[:-len(".jsonl")] + ".settings.json"
    if os.path.exists(path) and os.path.exists(settings_path):
      with open(settings_path) as f:
        old = json.load(f)
      changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{path} was generated with other settings ({diff}); use a fresh "
                         f"--workdir, or delete {path} and {settings_path} to regenerate.")
    if not os.path.exists(path):
      preferences.generate(task, policy, mesh, config, split, n, path)
      write_json(settings_path, settings)
    out[split] = path
  return (sources.read_jsonl(out["train"], "preference"),
          sources.read_jsonl(out["eval"], "preference"), out)


def _generation_settings(config, split: str, num_prompts: int) -> dict[str, Any]:
  """Everything that determines a generated preference file (the SFT policy aside)."""
  d = config.data
  keys = ("task", "samples_per_prompt", "generation_batch_size", "annotator_temperature",
          "annotator_seed", "drop_ties",
          "max_prompt_len", "max_completion_len")
  return {"split": split, "num_prompts": num_prompts, "seed": config.seed,
          **{k: d[k] for k in keys},
          **{f"sampling.{k}": v for k, v in config.sampling.to_dict().items()}}


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  d = config.data
  mesh = sharding.make_mesh(config.mesh)
  policy = sft.ensure_policy(config.sft, workdir, mesh, config.sft_checkpoint)
  tok, model_cfg = policy.tokenizer, policy.model_config
  task = None if (d.train_path or d.tfds_name) else tasks.get_task(d.task)
  train_recs, eval_recs, names = _preference_records(config, workdir, task, policy, mesh)

  arrays, counts = {}, {}
  for split, recs in (("train", train_recs), ("eval", eval_recs)):
    counts[split] = batching.PreferenceCounts()
    arrays[split] = batching.preference_arrays(recs, tok, d.max_prompt_len, d.max_completion_len,
                                               counts[split], d.bad_pairs, names[split])
    logging.info("[rm] %s pairs from %s: %s", split, names[split], counts[split])

  graphdef, params = sharding.init_sharded(
      lambda: RewardModel(model_cfg, nnx.Rngs(params=config.seed)), mesh)
  if config.init == "sft":  # trunk from the SFT policy; the reward head stays freshly initialised
    # (create_train_state below copies it, so donating the RM state never frees the policy's.)
    params["trunk"] = policy.params["trunk"]
  elif config.init != "scratch":
    raise ValueError(f"rm config: init is {config.init!r}; choose 'sft' or 'scratch'.")

  tx = optim.make_optimizer(config.optim)
  state, shardings = state_lib.create_train_state(params, tx, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in arrays["train"].items()}
  loss_fn = functools.partial(rm_loss, centering_coef=config.loss.centering_coef)
  step = state_lib.make_train_step(graphdef, loss_fn, tx, mesh, shardings, batch_sh,
                                   config.optim.grad_accum_steps)
  gold = None
  if task is not None:
    gold = [(task.gold_reward(r["prompt"], r["chosen"]), task.gold_reward(r["prompt"], r["rejected"]))
            for r in eval_recs if r["chosen"] != r["rejected"]]
  evaluate = _make_evaluator(graphdef, arrays["eval"], gold, d.batch_size, mesh)

  out_dir = sft.stage_dir(workdir, "rm")
  writer = loop.MetricsWriter(workdir, "rm")
  ckpt = None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"),
                                   config.train.checkpoint_every, config.train.keep_checkpoints)
  batches = batching.EpochIterator(arrays["train"], d.batch_size, config.seed,
                                   *sharding.process_block(mesh))
  state = loop.resume(ckpt, state, batches, writer)
  state, metrics = loop.train_loop(
      step, state, batches, num_steps=config.train.num_steps, log_every=config.train.log_every,
      writer=writer, shard=lambda b: sharding.shard_batch(b, mesh), checkpointer=ckpt,
      eval_fn=evaluate, eval_every=config.train.eval_every)

  # Normalise on fresh SFT samples for the training prompts.
  prompts = [r["prompt"] for r in train_recs][:config.normalize.num_samples]
  prompts = (prompts * (config.normalize.num_samples // max(len(prompts), 1) + 1))[
      :config.normalize.num_samples]
  texts = preferences.sample_completions(policy, prompts, mesh, d.max_prompt_len,
                                         d.max_completion_len, config.sampling,
                                         d.generation_batch_size, config.seed + 2)
  raw = score_texts(graphdef, state.params, tok, prompts, texts, d.max_prompt_len,
                    d.max_completion_len, d.generation_batch_size, mesh)
  gain, bias = normalization(raw)
  norm = {"gain": gain, "bias": bias, "raw_mean": float(raw.mean()), "raw_std": float(raw.std()),
          "num_samples": len(raw)}
  metrics.update({f"normalization/{k}": v for k, v in norm.items()})
  for split in ("train", "eval"):
    for k, v in dataclasses.asdict(counts[split]).items():
      metrics[f"data/{split}_{k}"] = v
  if out_dir:
    write_json(os.path.join(out_dir, "model_config.json"), model_cfg.to_dict())
    write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_lib.describe(tok))
    write_json(os.path.join(out_dir, "normalization.json"), norm)
    write_json(os.path.join(out_dir, "summary.json"), metrics)
    ckpt.close()
  writer.write(int(state.step), {k: v for k, v in metrics.items() if k.startswith("normalization")})
  writer.close()
  logging.info("[rm] normalisation on %d SFT samples: raw mean %.3f std %.3f -> gain %.3f bias %.3f",
               len(raw), raw.mean(), raw.std(), gain, bias)
  return {"metrics": metrics, "state": state, "graphdef": graphdef,
          "reward": RewardFunction(graphdef, state.params, gain, bias, model_cfg, tok)}


def normalization(raw_scores: np.ndarray) -> tuple[float, float]:
  """(gain, bias) with gain * raw + bias of mean 0 and std 1 over `raw_scores`."""
  raw_scores = np.asarray(raw_scores, np.float64)
  std = raw_scores.std()
  if not np.isfinite(std) or std < 1e-8:
    raise FloatingPointError(f"RM scores of SFT samples have std {std}; cannot normalise (is the "
                             "reward model constant?).")
  return float(1.0 / std), float(-raw_scores.mean() / std)


def score_texts(graphdef, params, tok, prompts, completions, max_prompt_len: int,
                max_completion_len: int, batch_size: int, mesh) -> np.ndarray:
  """Raw RM scores of prompt + completion texts, in the training layout (EOS appended)."""
  recs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
  bs = batch_size
  recs = recs + [recs[-1]] * (-len(recs) % bs)
  arr = batching.sft_arrays(recs, tok, max_prompt_len, max_completion_len)
  fwd = jax.jit(lambda p, t, m: _eval_model(graphdef, p)(t, m))
  out = []
  with sharding.use_mesh(mesh):
    for i in range(0, len(recs), bs):
      b = sharding.shard_global_batch({"t": arr["tokens"][i:i + bs], "m": arr["mask"][i:i + bs]},
                                      mesh)
      out.append(np.asarray(sharding.to_host(fwd(params, b["t"], b["m"]))))
  return np.concatenate(out)[:len(prompts)]


def _make_evaluator(graphdef, eval_arrays, gold, bs, mesh):
  """Held-out accuracy against the labels and, on bundled tasks, against the gold order."""
  scores = jax.jit(lambda p, b: pair_scores(_eval_model(graphdef, p), b))
  n = len(eval_arrays["margin"])
  if n == 0:
    raise ValueError("no held-out preference pairs left after dropping bad pairs.")
  idx = np.arange(n + (-n % bs)) % n  # fixed batch shape: wrap around to fill the last batch
  padded = {k: v[idx] for k, v in eval_arrays.items()}

  def evaluate(state):
    rc, rr = [], []
    with sharding.use_mesh(mesh):
      for i in range(0, len(padded["margin"]), bs):
        b = sharding.shard_global_batch({k: v[i:i + bs] for k, v in padded.items()}, mesh)
        c, r = sharding.to_host(scores(state.params, b))
        rc.append(c)
        rr.append(r)
    diff = (np.concatenate(rc) - np.concatenate(rr))[:n]
    metrics = {"eval_accuracy": float(np.mean(diff > 0)), "eval_margin": float(diff.mean()),
               "eval_loss": float(np.mean(np.logaddexp(0.0, -(diff - eval_arrays["margin"]))))}
    if gold:
      g = np.asarray(gold)
      untied = g[:, 0] != g[:, 1]
      agree = np.sign(diff[untied]) == np.sign(g[untied, 0] - g[untied, 1])
      metrics["eval_gold_agreement"] = float(np.mean(agree))
    return metrics

  return evaluate
