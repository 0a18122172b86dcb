"""Supervised fine-tuning: masked next-token cross-entropy on the completion.

    loss = sum_t loss_mask[t+1] * CE(logits[t], tokens[t+1]) / sum_t loss_mask[t+1]

`run` is the stage's loop glue: tokenize the task's records into fixed shapes, initialise
the policy directly sharded on the mesh, and train with the shared jitted step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import batching, tasks
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import PolicyModel, TransformerConfig
from rlhf_jax.train import loop, optim, state as state_lib


def sft_loss(model: PolicyModel, batch: dict[str, jax.Array]):
  """(mean CE over completion tokens, metrics). Pure; used under jit and grad."""
  logits_BxTxV, _ = model(batch["tokens"], batch["mask"])
  targets_BxT1 = batch["tokens"][:, 1:]
  weights_BxT1 = batch["loss_mask"][:, 1:].astype(jnp.float32)
  ce_BxT1 = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], targets_BxT1)
  n = jnp.maximum(weights_BxT1.sum(), 1.0)
  loss = (ce_BxT1 * weights_BxT1).sum() / n
  correct = (jnp.argmax(logits_BxTxV[:, :-1], -1) == targets_BxT1).astype(jnp.float32)
  return loss, {"token_accuracy": (correct * weights_BxT1).sum() / n, "num_tokens": n}


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Trains the policy with SFT on `config.data.task`; returns the final metrics."""
  tok = ByteTokenizer()
  model_cfg = TransformerConfig.from_config(dict(config.model, vocab_size=tok.vocab_size))
  task = tasks.get_task(config.data.task)
  d = config.data
  counts = batching.TruncationCounts()
  train = batching.sft_arrays(task.sft_records(d.num_train, config.seed), tok,
                              d.max_prompt_len, d.max_completion_len, counts)
  held_out = batching.sft_arrays(task.sft_records(d.num_eval, config.seed + 1), tok,
                                 d.max_prompt_len, d.max_completion_len, counts)
  logging.info("[sft] %d train / %d eval records; truncated prompts %d, completions %d",
               d.num_train, d.num_eval, counts.prompts, counts.completions)

  mesh = sharding.make_mesh(config.mesh)
  logging.info("[sft] mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)
  graphdef, params = sharding.init_sharded(
      lambda: PolicyModel(model_cfg, nnx.Rngs(params=config.seed)), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("[sft] policy: %.2fM parameters, %s", n_params / 1e6, model_cfg)

  tx = optim.make_optimizer(config.optim)
  state, shardings = state_lib.create_train_state(params, tx, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in train}
  step = state_lib.make_train_step(graphdef, sft_loss, tx, mesh, shardings, batch_sh)

  eval_loss = jax.jit(lambda p, b: sft_loss(nnx.merge(graphdef, p), b))

  def evaluate(st):
    rows = []
    bs = d.batch_size
    for i in range(0, len(held_out["tokens"]) - bs + 1, bs):
      b = sharding.shard_batch({k: v[i:i + bs] for k, v in held_out.items()}, mesh)
      with sharding.use_mesh(mesh):
        loss, m = eval_loss(st.params, b)
      rows.append({"eval_loss": loss, "eval_token_accuracy": m["token_accuracy"]})
    return loop.mean_metrics(jax.device_get(rows))

  writer = loop.MetricsWriter(os.path.join(workdir, "metrics.jsonl") if workdir else None, "sft")
  batches = batching.EpochIterator(train, d.batch_size, config.seed)
  tokens_per_batch = d.batch_size * (d.max_prompt_len + d.max_completion_len)
  state, metrics = loop.train_loop(
      step, state, batches, config.train.num_steps, config.train.log_every, writer,
      shard=lambda b: sharding.shard_batch(b, mesh), tokens_per_batch=tokens_per_batch,
      eval_fn=evaluate, eval_every=config.train.eval_every)
  metrics["truncated_prompts"] = counts.prompts
  metrics["truncated_completions"] = counts.completions
  return {"metrics": metrics, "state": state, "graphdef": graphdef, "model_config": model_cfg}
