"""Policy, value and reward networks: one `Transformer` trunk, three heads.

* `PolicyModel`: logits [B, T, V] (float32), LM head tied to the embedding or separate.
* `ValueModel`:  a scalar per token [B, T]; linear head initialised to zero, so a fresh
  critic predicts 0 everywhere (the shared-trunk PPO convention).
* `RewardModel`: a scalar per sequence [B], read at the last non-pad token; head initialised
  N(0, 1/sqrt(d_model + 1)) as in lm-human-preferences.
* `ActorCritic`: what PPO trains, a policy plus a separate critic or a value head on the
  policy's trunk, read at the response positions only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.layers import dense, param
from rlhf_jax.models.transformer import KVCache, Transformer


class PolicyModel(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Transformer(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                               cfg.init_std, cfg.jnp_param_dtype)

  def __call__(self, tokens_BxT, mask_BxT, cache: KVCache | None = None):
    """(logits_BxTxV in float32, updated cache or None)."""
    h_BxTxD, cache = self.trunk(tokens_BxT, mask_BxT, cache)
    return self.logits(h_BxTxD), cache

  def head_weight(self) -> jax.Array:
    """The LM head matrix [D, V] in the compute dtype (the embedding's transpose if tied)."""
    w_DxV = self.trunk.embed_VxD[...].T if self.cfg.tie_embeddings else self.lm_head_DxV[...]
    return w_DxV.astype(self.cfg.jnp_dtype)

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """The LM head on trunk hidden states (a value head can share the same trunk pass)."""
    # float32 logits: log-probs and KL in RL are differences of large numbers.
    return dense(h_BxTxD.astype(self.cfg.jnp_dtype), self.head_weight(),
                 preferred_element_type=jnp.float32)


class ScalarHead(nnx.Module):
  """Linear D -> 1 with bias, computed in float32."""

  def __init__(self, cfg: TransformerConfig, std: float, rngs: nnx.Rngs):
    self.w_Dx1 = param(rngs, (cfg.d_model, 1), ("embed", "scalar"), std, jnp.float32)
    self.b_1 = nnx.Param(jnp.zeros((1,), jnp.float32), logical_axes=("scalar",))

  def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
    out_BxTx1 = h_BxTxD.astype(jnp.float32) @ self.w_Dx1[...] + self.b_1[...]
    return out_BxTx1[..., 0]


class ValueModel(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Transformer(cfg, rngs)
    self.value_head = ScalarHead(cfg, 0.0, rngs)

  def __call__(self, tokens_BxT, mask_BxT, keep: slice | None = None) -> jax.Array:
    """Value estimate per token, [B, T] float32; with `keep`, at those positions only."""
    h_BxTxD, _ = self.trunk(tokens_BxT, mask_BxT, keep=keep)
    return self.value_head(h_BxTxD)


class RewardModel(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Transformer(cfg, rngs)
    self.reward_head = ScalarHead(cfg, 1.0 / math.sqrt(cfg.d_model + 1), rngs)

  def per_token(self, tokens_BxT, mask_BxT) -> jax.Array:
    """The head applied at every position, [B, T] (a critic initialised from the RM uses it)."""
    h_BxTxD, _ = self.trunk(tokens_BxT, mask_BxT)
    return self.reward_head(h_BxTxD)

  def __call__(self, tokens_BxT, mask_BxT) -> jax.Array:
    """Score of each sequence, read at its last non-pad token, [B] float32."""
    h_Bx1xD, _ = self.trunk(tokens_BxT, mask_BxT, last_only=True)
    return self.reward_head(h_Bx1xD)[:, 0]


class ActorCritic(nnx.Module):
  """What PPO trains, so that one optimizer and one jitted step update it all: the policy and
  a critic that is either a separate network (`critic`) or a value head on the policy's own
  trunk (`value_head`; half the compute, but value gradients then move the policy too)."""

  def __init__(self, policy: PolicyModel, critic: ValueModel | None = None,
               value_head: ScalarHead | None = None):
    if (critic is None) == (value_head is None):
      raise ValueError("ActorCritic takes exactly one of `critic` and `value_head`.")
    self.policy = policy
    self.critic = critic
    self.value_head = value_head

  def __call__(self, seq_BxT, mask_BxT):
    """(policy logits [B, T, V], values [B, T]) at every position."""
    if self.critic is not None:
      return self.policy(seq_BxT, mask_BxT)[0], self.critic(seq_BxT, mask_BxT)
    h_BxTxD, _ = self.policy.trunk(seq_BxT, mask_BxT)
    return self.policy.logits(h_BxTxD), self.value_head(h_BxTxD)

  def on_response(self, seq_BxT, mask_BxT, n: int):
    """(policy logits [B, N, V], values [B, N]) at the positions that predict the last N
    tokens of `seq_BxT`, the response. What PPO's experience pass and loss both use."""
    keep = response_positions(n)
    h_BxNxD, _ = self.policy.trunk(seq_BxT, mask_BxT, keep=keep)
    logits_BxNxV = self.policy.logits(h_BxNxD)
    if self.critic is not None:
      return logits_BxNxV, self.critic(seq_BxT, mask_BxT, keep=keep)
    return logits_BxNxV, self.value_head(h_BxNxD)


def response_positions(n: int) -> slice:
  """The positions that predict the N response tokens, P-1 .. P+N-2 of the sequence.

  The trunks return hidden states at these positions only (`Transformer`'s `keep`): the
  prompt positions' logits would be a [B, P, V] float32 buffer (and gradient) and head FLOPs
  for nothing, and their last-block queries and MLP are not needed either.
  """
  return slice(-n - 1, -1)


def response_logits(policy: PolicyModel, seq_BxT, mask_BxT, n: int):
  """A policy's logits at the response positions, [B, N, V] (e.g. the frozen reference)."""
  h_BxNxD, _ = policy.trunk(seq_BxT, mask_BxT, keep=response_positions(n))
  return policy.logits(h_BxNxD)


MODEL_KINDS = {"policy": PolicyModel, "value": ValueModel, "reward": RewardModel}


def build(kind: str, cfg: TransformerConfig, seed: int = 0) -> nnx.Module:
  """A freshly initialised network of one of `MODEL_KINDS`."""
  if kind not in MODEL_KINDS:
    raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_KINDS)}.")
  return MODEL_KINDS[kind](cfg, nnx.Rngs(params=seed))
