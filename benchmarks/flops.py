"""Analytic model FLOPs (matmuls only, 2 FLOPs per multiply-add) for MFU.

Conventions (PaLM-style model FLOPs, no recomputation counted):
* per token and layer: q/k/v/o projections, SwiGLU gate/up/down;
* attention scores and the weighted sum: 2 * 2 * num_heads * head_dim * keys per query,
  with `keys` the context the query needs (causal: the full length T for a training forward,
  as in PaLM's 6N + 12LHQT; the prompt for a prefill; the prompt + tokens so far in decode);
* heads: the LM head (d_model x vocab) only where its output is needed (every position for
  SFT, the last prompt position and each decode step for generation, the response positions
  for PPO), a scalar head (d_model x 1) per position for value/reward networks;
* a training step = 3 x forward (backward = 2 x forward); the optimizer is not counted.
What XLA actually executes is reported separately from `compiled.cost_analysis()` (`hlo_flops`).
"""

from __future__ import annotations

from rlhf_jax.models import TransformerConfig


def layer_matmul_flops_per_token(cfg: TransformerConfig) -> float:
  d, n, k, h, f = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                   cfg.mlp_dim)
  return 2.0 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)


def attention_flops_per_query(cfg: TransformerConfig, keys: float) -> float:
  return 2.0 * 2 * cfg.num_heads * cfg.resolved_head_dim * keys


def trunk_forward(cfg: TransformerConfig, tokens: float, keys_per_query: float) -> float:
  """Trunk forward over `tokens` query tokens, each attending to `keys_per_query` keys."""
  per_token = cfg.num_layers * (layer_matmul_flops_per_token(cfg)
                                + attention_flops_per_query(cfg, keys_per_query))
  return tokens * per_token


def lm_head(cfg: TransformerConfig, positions: float) -> float:
  return 2.0 * cfg.d_model * cfg.vocab_size * positions


def scalar_head(cfg: TransformerConfig, positions: float) -> float:
  return 2.0 * cfg.d_model * positions


def sft_step(cfg: TransformerConfig, batch: int, seq: int) -> float:
  return 3.0 * (trunk_forward(cfg, batch * seq, seq) + lm_head(cfg, batch * seq))


def rm_step(cfg: TransformerConfig, sequences: int, seq: int) -> float:
  return 3.0 * (trunk_forward(cfg, sequences * seq, seq) + scalar_head(cfg, sequences * seq))


def generate(cfg: TransformerConfig, batch: int, prompt: int, new: int) -> float:
  """Prefill of the prompt (logits at its last position) + new-1 one-token decode steps
  (token t attends to prompt + t keys) with logits at each."""
  prefill = trunk_forward(cfg, batch * prompt, prompt) + lm_head(cfg, batch)
  decode = sum(trunk_forward(cfg, batch, prompt + t) + lm_head(cfg, batch)
               for t in range(1, new))
  return prefill + decode


def ppo_iteration(cfg: TransformerConfig, batch: int, prompt: int, response: int,
                  updates: int) -> dict[str, float]:
  """Rollout + experience (policy, ref, critic, reward forwards) + `updates` x (policy +
  critic forward and backward) on batch x (prompt + response), separate critic."""
  t = prompt + response
  policy_fwd = trunk_forward(cfg, batch * t, t) + lm_head(cfg, batch * response)
  scalar_fwd = trunk_forward(cfg, batch * t, t) + scalar_head(cfg, batch * t)
  out = {
      "rollout": generate(cfg, batch, prompt, response),
      "experience": 2 * policy_fwd + 2 * scalar_fwd,  # policy + ref, critic + reward
      "update": updates * 3.0 * (policy_fwd + scalar_fwd),
  }
  out["total"] = sum(out.values())
  return out


def param_count(cfg: TransformerConfig, lm_head_: bool = True) -> int:
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                      cfg.mlp_dim, cfg.vocab_size)
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
  total = v * d + cfg.num_layers * per_layer + d
  if lm_head_ and not cfg.tie_embeddings:
    total += d * v
  return total
