"""Supervised fine-tuning: masked next-token cross-entropy.

    loss = sum_t w[t+1] * CE(logits[t], tokens[t+1]) / sum_t w[t+1]

with w the completion tokens (incl. EOS) by default, or every real token
(`data.loss_on="all"`); an MoE policy adds its auxiliary losses (`models/moe.py`). `run` is
the stage's glue: tokenizer, data, a policy initialised sharded on the mesh, the shared
jitted step, checkpoints with exact resume, eval loss and perplexity, and sample
continuations (with their gold reward on bundled tasks).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from rlhf_jax.fileio import write_json
from rlhf_jax.data import batching, records as records_lib, tokenizer as tokenizer_lib
from rlhf_jax.models import PolicyModel, TransformerConfig, lm_loss, moe, pretrained
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import checkpoint, loop, optim, state as state_lib


def sft_loss(model: PolicyModel, batch: dict[str, jax.Array]):
  """(token CE + MoE auxiliary losses, metrics). Pure; used under jit and grad.

  A dense model has no auxiliary loss (0) and no `moe/` or `ce_loss` metrics.
  """
  loss, metrics = token_ce(model, batch)
  aux, aux_metrics = moe.aux_loss(model)
  if aux_metrics:
    metrics = dict(metrics, ce_loss=loss, **aux_metrics)
  return loss + aux, metrics


def token_ce(model: PolicyModel, batch: dict[str, jax.Array]):
  """(mean CE over weighted target tokens, metrics)."""
  h_BxTxD, _ = model.trunk(batch["tokens"], batch["mask"])
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


def stage_dir(workdir: str | None, stage: str) -> str | None:
  return os.path.join(workdir, stage) if workdir else None


@dataclasses.dataclass
class Policy:
  """A trained policy, as later stages need it."""
  graphdef: Any
  params: Any
  model_config: TransformerConfig
  tokenizer: tokenizer_lib.Tokenizer


def load_network(stage_dir: str, model_cls, mesh, extra_files=(), hint: str = ""):
  """(graphdef, params, model config, tokenizer) of a finished stage folder
  (model_config.json, tokenizer.json, checkpoints/), params placed on `mesh`."""
  for name in ("model_config.json", "tokenizer.json", *extra_files):
    if not os.path.exists(os.path.join(stage_dir, name)):
      raise FileNotFoundError(f"{stage_dir}: no {name}; {hint}")
  with open(os.path.join(stage_dir, "model_config.json")) as f:
    model_cfg = TransformerConfig.from_config(json.load(f))
  with open(os.path.join(stage_dir, "tokenizer.json")) as f:
    tok = tokenizer_lib.from_description(json.load(f))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(model_cfg, nnx.Rngs(0))))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, sharding.param_shardings(abstract, mesh))
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), save_every=0)
  params = ckpt.restore_params(abstract)
  ckpt.close()
  return graphdef, params, model_cfg, tok


def load_policy(sft_dir: str, mesh) -> Policy:
  """The final SFT policy of `<sft_dir>` (a workdir's `sft` folder)."""
  return Policy(*load_network(sft_dir, PolicyModel, mesh, hint="expected the 'sft' folder of "
                              "a workdir (e.g. --config.sft_checkpoint=workdir/sft)."))


def ensure_policy(sft_config: ml_collections.ConfigDict, workdir: str | None, mesh,
                  checkpoint_path: str = "") -> Policy:
  """The SFT policy a later stage starts from: `checkpoint_path` if given, else the one in
  `<workdir>/sft` if that run finished, else trains (or resumes) it now."""
  if checkpoint_path:
    return load_policy(checkpoint_path, mesh)
  sft_dir = stage_dir(workdir, "sft")
  if sft_dir and os.path.isdir(os.path.join(sft_dir, "checkpoints")):
    ckpt = checkpoint.Checkpointer(os.path.join(sft_dir, "checkpoints"), save_every=0)
    done = ckpt.latest_step() == sft_config.train.num_steps
    ckpt.close()
    if done:
      logging.info("[sft] reusing the finished SFT run in %s", sft_dir)
      return load_policy(sft_dir, mesh)
  result = run(sft_config, workdir)
  params = result["state"].params
  params = jax.device_put(params, sharding.param_shardings(params, mesh))  # onto this mesh
  return Policy(result["graphdef"], params, result["model_config"], result["tokenizer"])


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Trains the policy with SFT; returns final metrics, state and what later stages need."""
  d = config.data
  data = records_lib.load_sft_data(config, workdir)
  tok = data.tokenizer
  model_cfg = TransformerConfig.from_config(dict(config.model, vocab_size=tok.vocab_size))

  counts = batching.TruncationCounts()
  arrays = {}
  for split, recs in (("train", data.train), ("eval", data.eval)):
    arrays[split] = batching.sft_arrays(recs, tok, d.max_prompt_len, d.max_completion_len, counts,
                                        truncation=d.truncation, loss_on=d.loss_on,
                                        source=data.sources[split])
  logging.info("[sft] %d train / %d eval records; truncated prompts %d, completions %d",
               len(data.train), len(data.eval), counts.prompts, counts.completions)

  mesh = sharding.make_mesh(config.mesh)
  logging.info("[sft] mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)
  if config.get("init_from"):  # a pretrained checkpoint decides the architecture and weights
    graphdef, params, model_cfg = pretrained.init_policy(
        config.init_from, config.model.to_dict(), tok.vocab_size, mesh,
        cache_dir=stage_dir(workdir, "pretrained"))
  else:
    graphdef, params = sharding.init_sharded(
        lambda: PolicyModel(model_cfg, nnx.Rngs(params=config.seed)), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("[sft] policy: %.2fM parameters, %s", n_params / 1e6, model_cfg)

  tx = optim.make_optimizer(config.optim)
  state, shardings = state_lib.create_train_state(params, tx, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in arrays["train"]}
  step = state_lib.make_train_step(graphdef, sft_loss, tx, mesh, shardings, batch_sh,
                                   config.optim.grad_accum_steps)
  evaluate = make_evaluator(graphdef, config, data, arrays["eval"], tok, mesh)

  out_dir = stage_dir(workdir, "sft")
  writer = loop.MetricsWriter(workdir, "sft")
  ckpt = None
  if out_dir:
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"),
                                   config.train.checkpoint_every, config.train.keep_checkpoints)
    write_json(os.path.join(out_dir, "model_config.json"), model_cfg.to_dict())
    write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_lib.describe(tok))
  batches = batching.EpochIterator(arrays["train"], d.batch_size, config.seed,
                                   *sharding.process_block(mesh))
  state = loop.resume(ckpt, state, batches, writer)
  state, metrics = loop.train_loop(
      step, state, batches, num_steps=config.train.num_steps, log_every=config.train.log_every,
      writer=writer, shard=lambda b: sharding.shard_batch(b, mesh), checkpointer=ckpt,
      tokens_per_batch=d.batch_size * (d.max_prompt_len + d.max_completion_len),
      eval_fn=evaluate, eval_every=config.train.eval_every)
  if ckpt:
    ckpt.close()
  writer.close()
  metrics.update(truncated_prompts=counts.prompts, truncated_completions=counts.completions)
  return {"metrics": metrics, "state": state, "graphdef": graphdef, "model_config": model_cfg,
          "tokenizer": tok}


def make_evaluator(graphdef, config, data, eval_arrays, tok, mesh):
  """Eval loss/perplexity over the held-out set, plus sampled continuations."""
  bs = config.data.batch_size

  @jax.jit
  def eval_loss(params, b):
    model = nnx.merge(graphdef, params)
    model.eval()  # MoE layers: eval capacity factor, no router jitter
    return token_ce(model, b)

  s = config.sampling
  sampler = make_sampler(graphdef, SamplingConfig(
      max_new_tokens=config.data.max_completion_len, temperature=s.temperature, top_k=s.top_k,
      top_p=s.top_p), eos_id=tok.eos_id, pad_id=tok.pad_id)
  p_len = config.data.max_prompt_len
  sample_batch = {k: v[:bs, :p_len] for k, v in eval_arrays.items() if k != "loss_mask"}
  prompts = [r["prompt"] for r in data.eval[:bs]]

  def evaluate(state) -> dict[str, float]:
    rows = []
    n = len(eval_arrays["tokens"])
    with sharding.use_mesh(mesh):
      for i in range(0, n - bs + 1, bs):
        b = sharding.shard_global_batch({k: v[i:i + bs] for k, v in eval_arrays.items()}, mesh)
        loss, m = eval_loss(state.params, b)
        rows.append({"eval_loss": loss, "eval_token_accuracy": m["token_accuracy"]})
      rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), int(state.step))
      b = sharding.shard_global_batch(sample_batch, mesh)
      out = sharding.to_host(sampler(state.params, b["tokens"], b["mask"], rng))
    metrics = loop.mean_metrics(jax.device_get(rows))
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    texts = [tok.decode(t[m.astype(bool)]) for t, m in zip(out["tokens"], out["mask"])]
    for prompt, text in list(zip(prompts, texts))[:config.train.num_samples_shown]:
      logging.info("[sft] sample: %r -> %r", prompt, text)
    if data.gold_reward is not None:
      metrics["gold/reward"] = float(np.mean(
          [data.gold_reward(p, t) for p, t in zip(prompts, texts)]))
    return metrics

  return evaluate
