"""Direct preference optimisation: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and
cDPO (label smoothing), offline, on preference pairs.

With h = [log pi(c) - log ref(c)] - [log pi(r) - log ref(r)] over the response tokens of
chosen c and rejected r (summed log-probs, the prompt excluded):

    dpo   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    (eps: cDPO)
    ipo   (h - 1 / (2 beta))^2

`ref` is the frozen SFT policy; its log-probs of every pair are computed once at the start and
stored in `<workdir>/dpo/reference_logps.npz` (a resumed run reads them back). The pairs are
the RM stage's (generated from the SFT policy and labelled by the simulated annotator, or
`rm.data`'s files) unless `dpo.data` names preference JSONL. No RM is needed to train; with
`dpo.reward="model"` the pipeline trains one only to report its score in the summary.

Metrics (TRL's names): `loss`, `rewards/{chosen,rejected,accuracies,margins}` (implicit
rewards beta * log pi/ref), `logps/{chosen,rejected}`; `eval_` + the same on held-out pairs.
The summary adds held-out gold reward and RM score of SFT vs DPO samples, the sampled KL to
the reference, and the log-likelihood preference accuracy of both policies on held-out pairs
(the fraction with log pi(c) > log pi(r)). Reads `config.dpo` and the shared sections.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import artifacts, evaluation, sampling, sharding
from rlhf_jax.data import batching, records as records_lib
from rlhf_jax.fileio import atomic_write
from rlhf_jax.models import PolicyModel, lora, moe
from rlhf_jax.models.heads import response_logits
from rlhf_jax.rl import core
from rlhf_jax.rl.losses import preference_loss
from rlhf_jax.train import optim, runner as runner_lib, state as state_lib

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")
LOG_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies")
REFERENCE_FILE = "reference_logps.npz"


def pair_logps(policy: PolicyModel, batch, prompt_len: int):
  """(log pi(chosen) [B], log pi(rejected) [B]): summed over response tokens, one forward over
  the 2B sequences (pairs in the SFT layout: prompt left-padded to `prompt_len`)."""
  tokens_2BxT = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
  mask_2BxT = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
  n = tokens_2BxT.shape[1] - prompt_len
  logits_2BxNxV = response_logits(policy, tokens_2BxT, mask_2BxT, n)
  resp_mask = mask_2BxT[:, prompt_len:].astype(jnp.float32)
  logp_2B = (core.token_logprobs(logits_2BxNxV, tokens_2BxT[:, prompt_len:]) * resp_mask
             ).sum(axis=1)
  return jnp.split(logp_2B, 2)


def dpo_loss(policy: PolicyModel, batch, prompt_len: int, beta: float, loss_type: str,
             label_smoothing: float):
  """(preference loss + MoE aux, TRL's metrics); `batch` carries the reference log-probs."""
  chosen, rejected = pair_logps(policy, batch, prompt_len)
  loss, metrics = preference_loss(chosen, rejected, batch["ref_chosen_logp"],
                                  batch["ref_rejected_logp"], beta, loss_type, label_smoothing)
  aux, aux_metrics = moe.aux_loss(policy)
  return loss + aux, {**metrics, **aux_metrics}


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]
  state: Any  # the final TrainState of the policy
  compiled: dict[str, int] = dataclasses.field(default_factory=dict)


def run(config, policy: artifacts.Policy, reward, prefs, task, mesh, workdir: str | None,
        rm_metrics: dict | None = None) -> Result:
  """Trains the SFT `policy` on `prefs` (`train`, `eval` record lists, `sources`); `task`
  (or None) gives the gold reward of held-out samples; `reward` (or None) their RM score."""
  d, p = config.dpo, config.data.max_prompt_len
  policy = artifacts.start_lora_stage(config, "dpo", policy, workdir, mesh)
  arrays = {split: _pair_arrays(config, prefs, policy.tokenizer, split)
            for split in ("train", "eval")}
  logps = jax.jit(functools.partial(_eval_logps, policy.graphdef, prompt_len=p))
  for split, a in arrays.items():
    a.update(reference_logps(workdir, split, a, lambda b: logps(policy.params, b),
                             d.data.batch_size, mesh))
  tx = optim.make_optimizer(d.optim)
  # The SFT policy stays the reference: with LoRA the base is shared, else all is copied.
  state, shardings = state_lib.create_from(policy.params, tx, mesh, lora.trainable_of(policy.model_config))
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in arrays["train"].items()}
  loss_fn = functools.partial(dpo_loss, prompt_len=p, beta=d.beta, loss_type=d.loss_type,
                              label_smoothing=d.label_smoothing)
  step = state_lib.make_train_step(policy.graphdef, loss_fn, tx, mesh, shardings, batch_sh,
                                   d.optim.grad_accum_steps)
  batches = batching.EpochIterator(arrays["train"], d.data.batch_size, config.seed,
                                   *sharding.process_block(mesh),
                                   source=f"{prefs.sources['train']} (pairs kept)",
                                   batch_key="dpo.data.batch_size")
  evaluate = functools.partial(_evaluate, config, logps, arrays["eval"], mesh)
  runner = runner_lib.StageRunner("dpo", workdir, runner_lib.LoopConfig.from_section(d.train))
  state, last = runner.run(lambda i, st, b: step(st, b), state, batches,
                           shard=lambda b: sharding.shard_batch(b, mesh), eval_fn=evaluate,
                           log_keys=LOG_KEYS)
  summary = _summary(config, policy, state.params, reward, task, prefs, arrays["eval"],
                     logps, mesh)
  final = evaluation.finish(config, "dpo", runner, {**last, **evaluate(state)}, summary,
                            rm_metrics, workdir)
  return Result(final, state, {"train_step": step.jitted._cache_size()})


def _pair_arrays(config, prefs, tok, split: str) -> dict[str, np.ndarray]:
  d = config.data
  counts = batching.PreferenceCounts()
  out = batching.preference_arrays(getattr(prefs, split), tok, d.max_prompt_len,
                                   d.max_completion_len, counts, config.rm.data.bad_pairs,
                                   prefs.sources[split])
  if not counts.kept:
    raise ValueError(f"dpo: no {split} preference pairs left in {prefs.sources[split]} "
                     f"({counts}); DPO needs pairs whose chosen and rejected differ.")
  logging.info("[dpo] %s pairs from %s: %s", split, prefs.sources[split], counts)
  return {k: out[k] for k in PAIR_KEYS}


def _eval_logps(graphdef, params, batch, prompt_len: int):
  return pair_logps(artifacts.eval_model(graphdef, params), batch, prompt_len)


def _all_logps(logps_fn, arrays, batch_size: int, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Summed response log-probs of chosen and rejected for every pair, in order."""
  n = len(arrays["chosen_mask"])
  outs = sharding.for_each_batch(lambda _, b: logps_fn(b), {k: arrays[k] for k in PAIR_KEYS},
                                 batch_size, mesh)
  return (np.concatenate([c for c, _ in outs])[:n].astype(np.float32),
          np.concatenate([r for _, r in outs])[:n].astype(np.float32))


def reference_logps(workdir: str | None, split: str, arrays, logps_fn, batch_size: int,
                    mesh) -> dict[str, np.ndarray]:
  """The frozen reference's log-probs of every pair of `split`: computed once and stored in
  `<workdir>/dpo/reference_logps.npz`, read back (and checked against the pairs) after."""
  out_dir = artifacts.stage_dir(workdir, "dpo")
  path = out_dir and os.path.join(out_dir, f"{split}_{REFERENCE_FILE}")
  n = len(arrays["chosen_mask"])
  if path and os.path.exists(path):
    with np.load(path) as f:
      stored = {k: f[k] for k in REF_KEYS}
    if len(stored["ref_chosen_logp"]) != n:
      raise ValueError(f"{path} holds reference log-probs of {len(stored['ref_chosen_logp'])} "
                       f"pairs but there are {n}; the pairs changed: delete it or use "
                       "--config.retrain=dpo.")
    return stored
  chosen, rejected = _all_logps(logps_fn, arrays, batch_size, mesh)
  stored = {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}
  if path and jax.process_index() == 0:
    buf = io.BytesIO()
    np.savez(buf, **stored)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(path, buf.getvalue())
  return stored


def _evaluate(config, logps, eval_arrays, mesh, state) -> dict[str, float]:
  """`eval_` + TRL's metrics on the held-out pairs."""
  d = config.dpo
  chosen, rejected = _all_logps(lambda b: logps(state.params, b), eval_arrays,
                                d.data.batch_size, mesh)
  loss, metrics = preference_loss(chosen, rejected, eval_arrays["ref_chosen_logp"],
                                  eval_arrays["ref_rejected_logp"], d.beta, d.loss_type,
                                  d.label_smoothing)
  return {"eval_loss": float(loss), **{f"eval_{k}": float(v) for k, v in metrics.items()}}


def _summary(config, policy, params, reward, task, prefs, eval_arrays, logps, mesh):
  """Held-out gold reward / RM score of SFT vs DPO samples, the DPO policy's sampled KL to
  the reference, and each policy's log-likelihood preference accuracy on held-out pairs."""
  d = config.dpo
  if task is not None:
    prompts = [r["prompt"] for r in task.prompts(d.data.num_eval_prompts, config.seed, "eval")]
  else:  # the held-out pairs' prompts, each once
    prompts = list(dict.fromkeys(r["prompt"] for r in prefs.eval))[:d.data.num_eval_prompts]
  tok = policy.tokenizer
  sampler = sampling.make_sampler(
      policy.graphdef, sampling.from_config(config.sampling, config.data.max_completion_len),
      tok.eos_id, tok.pad_id)
  score = None if reward is None else jax.jit(reward.score)
  held_out = records_lib.Prompts([], prompts, task)
  # PPO's default batch (64), so the SFT baseline draws the same samples as the RL stages'.
  bs = config.rm.data.generation_batch_size
  summary = evaluation.held_out_summary(config, "dpo", policy, params, reward, sampler, score,
                                        held_out, mesh, bs, with_kl=True)
  for name, p in (("sft", policy.params), ("dpo", params)):
    chosen, rejected = _all_logps(lambda b, p=p: logps(p, b), eval_arrays, bs, mesh)
    summary[f"final/{name}_preference_accuracy"] = float(np.mean(chosen > rejected))
  return summary

