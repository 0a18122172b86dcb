"""Activation bytes per device: the analytic half of `memory.py`'s estimate.

An analytic model of what a step keeps per device (batch rows split over data x fsdp x
expert; heads, MLP and vocab over tensor), per token and layer, bytes of the compute dtype
unless noted. A block's forward holds for its backward pass:
    residual stream and the two norm outputs         4 D
    q, k, v; q, k after RoPE; attention output        (3 N + 3 K) H / tensor
    SwiGLU gate, up, silu(gate), product             4 F / tensor
    attention logits and weights (float32)            8 N T / tensor
With rematerialisation (`model.remat`, see `transformer.REMAT_POLICIES`) and scanned layers
(`model.scan_layers`) a train step keeps per layer only what the policy saves, plus one
layer's whole set above (the block being recomputed during the backward pass):
    full           the block input                          D
    minimal        + the outputs of the projections q, k,   + 2 D + ((N + 2 K) H + 2 F) / tensor
                   v, o, gate, up, down
    dots_saveable  + attention logits (float32), output     + 4 N T / tensor + N H / tensor
Without scanned layers remat is counted as none: XLA is then free to schedule the
recomputation during the forward pass, and XLA:CPU does (a 22-layer SFT step keeps 1435 MiB
of temporaries with remat "full", 1556 MiB without; scanned: 127 MiB, the estimate 123 MiB).
Add float32 logits, log-softmax and their gradient, 12 V / tensor, at each position whose
logits are read (the caller says how many). A training step keeps all layers for the
backward pass; a forward-only pass (experience, reference log-probs, RM scores) one layer at
a time plus its logits. Generation holds a KV cache of 2 L T K H (compute dtype) per row;
G samples per prompt prefill each prompt once and repeat its cache G times. MoE layers are
counted as dense.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from rlhf_jax import sharding
from rlhf_jax.models import TransformerConfig


class Activations:
  """Bytes per device of activations for one network shape on one mesh."""

  def __init__(self, cfg: TransformerConfig, mesh: Mapping[str, int]):
    self.cfg = cfg
    self.rows = math.prod(mesh[a] for a in sharding.BATCH_AXES)
    self.tp = mesh["tensor"]
    self.dt = np.dtype(cfg.jnp_dtype).itemsize

  def local_rows(self, batch: int) -> int:
    return -(-batch // self.rows)

  def _mlp_dim(self) -> int:
    c = self.cfg
    return (c.moe.expert_mlp_dim or c.mlp_dim) if c.moe.num_experts else c.mlp_dim

  def per_token_layer(self, t: int) -> float:
    """What one block's forward holds for its backward, per token (no remat)."""
    c = self.cfg
    n, k, h = c.num_heads, c.num_kv_heads, c.resolved_head_dim
    return (self.dt * (4 * c.d_model + (3 * n + 3 * k) * h / self.tp
                       + 4 * self._mlp_dim() / self.tp)
            + 8 * n * t / self.tp)

  @property
  def remat(self) -> str:
    """The rematerialisation a train step gets: `model.remat` under `model.scan_layers`."""
    return self.cfg.remat if self.cfg.scan_layers else "none"

  def saved_per_token_layer(self, t: int) -> float:
    """What a train step keeps of each layer until the backward pass, per token."""
    c, remat = self.cfg, self.remat
    if remat == "none":
      return self.per_token_layer(t)
    n, k, h, d = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.d_model
    saved = self.dt * d  # the block input
    if remat in ("minimal", "dots_saveable"):
      saved += self.dt * (2 * d + ((n + 2 * k) * h + 2 * self._mlp_dim()) / self.tp)
    if remat == "dots_saveable":
      saved += 4 * n * t / self.tp + self.dt * n * h / self.tp
    return saved

  def logits_per_token(self) -> float:
    return 12 * self.cfg.vocab_size / self.tp

  def train(self, batch: int, t: int, logit_positions: int | None = None) -> float:
    """`logit_positions` per row get LM logits (default all t; 0: a scalar head)."""
    rows = self.local_rows(batch)
    logits = t if logit_positions is None else logit_positions
    per_token = self.cfg.num_layers * self.saved_per_token_layer(t)
    if self.remat != "none":
      per_token += self.per_token_layer(t)  # the block recomputed in the backward pass
    return rows * (t * per_token + logits * self.logits_per_token())

  def forward(self, batch: int, t: int, logit_positions: int | None = None) -> float:
    rows = self.local_rows(batch)
    logits = t if logit_positions is None else logit_positions
    return rows * (t * self.per_token_layer(t) + logits * self.logits_per_token())

  def generate(self, batch: int, prompt_len: int, new_tokens: int, samples: int = 1) -> float:
    """`samples` responses to each of `batch` prompts: one prefill, its cache repeated."""
    c = self.cfg
    rows, t = self.local_rows(batch * samples), prompt_len + new_tokens
    cache = 2 * c.num_layers * rows * t * c.num_kv_heads * c.resolved_head_dim * self.dt / self.tp
    return cache + self.forward(batch, prompt_len, 1)  # + the prefill (last position's logits)
