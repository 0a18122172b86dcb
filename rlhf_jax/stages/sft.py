"""Supervised fine-tuning: masked next-token cross-entropy.

    loss = sum_t w[t+1] * CE(logits[t], tokens[t+1]) / sum_t w[t+1]

with w the completion tokens (incl. EOS) by default, or every real token
(`sft.data.loss_on="all"`); an MoE policy adds its auxiliary losses (`models/moe.py`). With
`data.packing` a row holds several examples (`data/packing.py`): the batch then carries
segment ids and per-example positions, and the same token mean is taken. `run`
is the stage: given its records and tokenizer, it builds a policy sharded on the mesh (or
imports pretrained weights), trains it with the shared jitted step under the stage runner
(checkpoints, exact resume), evaluates loss, perplexity and sample continuations (with their
gold reward on bundled tasks), and returns the trained `Policy`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rlhf_jax import artifacts, sampling, sharding
from rlhf_jax.data import batching, packing, records as records_lib
from rlhf_jax.models import PolicyModel, TransformerConfig, lm_loss, lora, moe, pretrained
from rlhf_jax.train import metrics as metrics_lib, optim, runner as runner_lib, state as state_lib


def sft_loss(model: PolicyModel, batch: dict[str, jax.Array]):
  """(token CE + MoE auxiliary losses, metrics). Pure; used under jit and grad.

  A dense model has no auxiliary loss (0) and no `moe/` or `ce_loss` metrics.
  """
  loss, metrics = token_ce(model, batch)
  metrics.update(row_stats(batch))
  aux, aux_metrics = moe.aux_loss(model)
  if aux_metrics:
    metrics = dict(metrics, ce_loss=loss, **aux_metrics)
  return loss + aux, metrics


def row_stats(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """How full the rows are, packed or not: the share of row tokens that are padding, and
  the examples per row (segments of a packed row; an unpacked row holds one)."""
  mask_BxT = batch["mask"].astype(jnp.float32)
  if "segment_ids" in batch:
    examples_B = batch["segment_ids"].max(axis=1).astype(jnp.float32)
  else:
    examples_B = mask_BxT.max(axis=1)
  return {"padding_fraction": 1.0 - mask_BxT.mean(), "examples_per_row": examples_B.mean()}


def token_ce(model: PolicyModel, batch: dict[str, jax.Array]):
  """(mean CE over weighted target tokens, metrics). A packed batch (`segment_ids`,
  `positions`) attends within each example only."""
  h_BxTxD, _ = model.trunk(batch["tokens"], batch["mask"],
                           segment_ids_BxT=batch.get("segment_ids"),
                           positions_BxT=batch.get("positions"))
  # The LM head only where there is a next token: the last position's logits would be
  # computed (and differentiated) for nothing.
  h_BxT1xD = h_BxTxD[:, :-1].astype(model.cfg.jnp_dtype)
  targets_BxT1 = batch["tokens"][:, 1:]
  weights_BxT1 = batch["loss_mask"][:, 1:].astype(jnp.float32)
  n = jnp.maximum(weights_BxT1.sum(), 1.0)
  if model.cfg.ce_chunk_len:
    ce_sum, correct_sum = lm_loss.chunked_token_ce(h_BxT1xD, model.head_weight(), targets_BxT1,
                                                   weights_BxT1, model.cfg.ce_chunk_len)
  else:
    logits_BxT1xV = model.logits(h_BxT1xD)
    ce_BxT1 = optax.softmax_cross_entropy_with_integer_labels(logits_BxT1xV, targets_BxT1)
    ce_sum = (ce_BxT1 * weights_BxT1).sum()
    # Correct when the target's logit is the maximum (an argmax is a slow index reduction on
    # CPU). A tie for the maximum counts as correct.
    target_BxT1 = jnp.take_along_axis(logits_BxT1xV, targets_BxT1[..., None], -1)[..., 0]
    correct_sum = ((target_BxT1 >= logits_BxT1xV.max(-1)) * weights_BxT1).sum()
  return ce_sum / n, {"token_accuracy": correct_sum / n, "num_tokens": n}


@dataclasses.dataclass
class Result:
  policy: artifacts.Policy  # the trained policy, on the mesh
  metrics: dict[str, float]
  state: Any  # the final TrainState


def run(config: ml_collections.ConfigDict, data: records_lib.StageData, mesh,
        workdir: str | None) -> Result:
  """Trains a policy with SFT on `data` (reads `config.sft` and the shared sections)."""
  s, tok = config.sft, data.tokenizer
  arrays, counts = _arrays(config, data)
  graphdef, params, model_cfg = _init_policy(config, tok, mesh, workdir)
  dense_graphdef, adapters = graphdef, lora.for_stage(config, "sft")
  # With LoRA, adapters on the frozen initial policy (the view the RL stages train too).
  trained = artifacts.lora_view(artifacts.Policy(graphdef, params, model_cfg, tok), adapters,
                                config.seed, mesh)
  graphdef, params = trained.graphdef, trained.params
  tx = optim.make_optimizer(s.optim)
  state, shardings = state_lib.create_train_state(
      params, tx, mesh, trainable=lora.trainable_of(trained.model_config))
  batches = _train_batches(config, data, arrays["train"], mesh)
  keys = packing.PACKED_KEYS if config.data.packing else arrays["train"]
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in keys}
  step = state_lib.make_train_step(graphdef, sft_loss, tx, mesh, shardings, batch_sh,
                                   s.optim.grad_accum_steps,
                                   dropout_seed=config.seed if adapters.dropout else None)
  evaluate = make_evaluator(graphdef, config, data, arrays["eval"], mesh)
  runner = runner_lib.StageRunner("sft", workdir, runner_lib.LoopConfig.from_section(s.train))
  seq_len = config.data.max_prompt_len + config.data.max_completion_len
  state, metrics = runner.run(lambda i, st, b: step(st, b), state, batches,
                              shard=lambda b: sharding.shard_batch(b, mesh), eval_fn=evaluate,
                              tokens_per_batch=s.data.batch_size * seq_len)
  runner.close()
  metrics.update(truncated_prompts=counts.prompts, truncated_completions=counts.completions)
  out_dir = artifacts.stage_dir(workdir, "sft")
  if out_dir and jax.process_index() == 0:
    if adapters.enabled:  # before summary.json (save_network), which marks the folder done
      artifacts.write_lora(out_dir, adapters, _lora_base(config, workdir))
    artifacts.save_network(out_dir, model_cfg, tok, metrics)
  params = artifacts.merged(state.params, adapters) if adapters.enabled else state.params
  return Result(artifacts.Policy(dense_graphdef, params, model_cfg, tok), metrics, state)


def _lora_base(config, workdir) -> dict:
  """Where a LoRA SFT's frozen base comes from (`artifacts.lora_base`)."""
  if config.init_from:
    return {"init_from": config.init_from, "model": config.model.to_dict(),
            "cache_dir": artifacts.stage_dir(workdir, "pretrained")}
  return {"seed": config.seed}


def _arrays(config, data):
  """Fixed-shape train/eval arrays and the truncation counts."""
  d, sd = config.data, config.sft.data
  counts = batching.TruncationCounts()
  arrays = {}
  for split, recs in (("train", data.train), ("eval", data.eval)):
    arrays[split] = batching.sft_arrays(recs, data.tokenizer, d.max_prompt_len,
                                        d.max_completion_len, counts, truncation=d.truncation,
                                        loss_on=sd.loss_on, source=data.sources[split])
  logging.info("[sft] %d train / %d eval records; truncated prompts %d, completions %d",
               len(data.train), len(data.eval), counts.prompts, counts.completions)
  return arrays, counts


def _train_batches(config, data, train_arrays, mesh):
  """The training batches: one example per row, or packed rows (`data.packing`), whose
  padding is logged against the unpacked rows'."""
  index, count = sharding.process_block(mesh)
  args = dict(batch_size=config.sft.data.batch_size, seed=config.seed, process_index=index,
              process_count=count, source=data.sources["train"],
              batch_key="sft.data.batch_size")
  if not config.data.packing:
    return batching.EpochIterator(train_arrays, **args)
  batches = packing.PackedIterator(train_arrays, pad_id=data.tokenizer.pad_id, **args)
  st = batches.stats(0)
  logging.info("[sft] packing: %d examples in %d rows (%.2f per row); padding %.1f%% of row "
               "tokens (unpacked %.1f%%)", st["examples"], st["rows"], st["examples_per_row"],
               100 * st["padding_fraction"], 100 * st["padding_fraction_unpacked"])
  return batches


def _init_policy(config, tok, mesh, workdir):
  """(graphdef, params, model config): pretrained weights (which decide the architecture)
  or a fresh policy, sharded on the mesh."""
  logging.info("[sft] mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)
  if config.init_from:
    graphdef, params, model_cfg = pretrained.init_policy(
        config.init_from, config.model.to_dict(), tok.vocab_size, mesh,
        cache_dir=artifacts.stage_dir(workdir, "pretrained"))
  else:
    model_cfg = TransformerConfig.from_config(dict(config.model, vocab_size=tok.vocab_size))
    graphdef, params = sharding.init_sharded(
        lambda: PolicyModel(model_cfg, nnx.Rngs(params=config.seed)), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("[sft] policy: %.2fM parameters, %s", n_params / 1e6, model_cfg)
  return graphdef, params, model_cfg


def make_evaluator(graphdef, config, data, eval_arrays, mesh):
  """Eval loss/perplexity over the held-out set, plus sampled continuations."""
  bs, tok = config.sft.data.batch_size, data.tokenizer

  @jax.jit
  def eval_loss(params, b):
    model = artifacts.eval_model(graphdef, params)  # MoE: eval capacity, no router jitter
    loss, m = token_ce(model, b)
    return {"eval_loss": loss, "eval_token_accuracy": m["token_accuracy"]}

  sampler = sampling.make_sampler(
      graphdef, sampling.from_config(config.sampling, config.data.max_completion_len),
      eos_id=tok.eos_id, pad_id=tok.pad_id)
  prompts = [r["prompt"] for r in data.eval[:bs]]

  def evaluate(state) -> dict[str, float]:
    rows = sharding.for_each_batch(lambda _, b: eval_loss(state.params, b), eval_arrays, bs,
                                   mesh, drop_remainder=True)
    metrics = metrics_lib.mean_metrics(rows)
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    texts = sampling.sample_texts(sampler, state.params, tok, prompts, mesh,
                                  config.data.max_prompt_len, bs,
                                  jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                                     int(state.step)))
    for prompt, text in list(zip(prompts, texts))[:config.sft.train.num_samples_shown]:
      logging.info("[sft] sample: %r -> %r", prompt, text)
    if data.gold_reward is not None:
      metrics["gold/reward"] = float(np.mean(
          [data.gold_reward(p, t) for p, t in zip(prompts, texts)]))
    return metrics

  return evaluate

