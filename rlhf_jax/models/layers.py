"""The pieces of a LLaMA block: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Shapes are in the names: B batch, T query length, S key length (the KV cache), D d_model,
N query heads, K key/value heads, H head dim, F SwiGLU hidden, V vocab.
Parameters carry logical axis names only (see `rlhf_jax/sharding.py` for the mesh mapping).
Statistics that are sensitive to precision (RMS, RoPE angles, softmax) run in float32
whatever the compute dtype, as Hugging Face's LLaMA does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import RopeScaling, TransformerConfig


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter tagged with its logical axes (std 0 gives zeros)."""
  value = std * jax.random.normal(rngs.params(), shape, dtype) if std else jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def take_at(x_BxTx_, index_B: jax.Array) -> jax.Array:
  """`x[b, index_B[b]]` for every row b, keeping the length axis: [B, 1, ...]."""
  index = index_B.reshape((-1, 1) + (1,) * (x_BxTx_.ndim - 2))
  return jnp.take_along_axis(x_BxTx_, index, axis=1)


class RMSNorm(nnx.Module):

  def __init__(self, cfg: TransformerConfig):
    self.eps = cfg.rms_norm_eps
    self.dtype = cfg.jnp_dtype
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.jnp_param_dtype), logical_axes=("norm",))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x.astype(self.dtype) * self.scale[...].astype(self.dtype)


def scale_inv_freq(inv_freq_H2: jax.Array, s: RopeScaling) -> jax.Array:
  """Inverse frequencies of a long-context checkpoint (Hugging Face's `rope_type` maths)."""
  if s.kind == "none":
    return inv_freq_H2
  if s.kind == "linear":
    return inv_freq_H2 / s.factor
  wavelen_H2 = 2 * math.pi / inv_freq_H2  # llama3
  n = s.original_max_position_embeddings
  smooth_H2 = (n / wavelen_H2 - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended_H2 = (1 - smooth_H2) * inv_freq_H2 / s.factor + smooth_H2 * inv_freq_H2
  return jnp.where(wavelen_H2 > n / s.low_freq_factor, inv_freq_H2 / s.factor,
                   jnp.where(wavelen_H2 < n / s.high_freq_factor, inv_freq_H2, blended_H2))


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float,
         scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary embedding in the Hugging Face LLaMA layout (rotate-half, not interleaved)."""
  h = x_BxTxNxH.shape[-1]
  inv_freq_H2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if scaling is not None:
    inv_freq_H2 = scale_inv_freq(inv_freq_H2, scaling)
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  angles_BxTx1xH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * jnp.cos(angles_BxTx1xH) + rotated * jnp.sin(angles_BxTx1xH)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
  """Causal self-attention with grouped-query heads and an optional KV cache."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    std, pdt = cfg.init_std, cfg.jnp_param_dtype
    self.theta = cfg.rope_theta
    self.rope_scaling = cfg.rope_scaling
    self.dtype = cfg.jnp_dtype
    self.q_DxNxH = param(rngs, (d, n, h), ("embed", "heads", "kv"), std, pdt)
    self.k_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std, pdt)
    self.v_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std, pdt)
    self.o_NxHxD = param(rngs, (n, h, d), ("heads", "kv", "embed"), std, pdt)
    self.qkv_bias = cfg.qkv_bias
    if cfg.qkv_bias:  # Qwen2-style; off by default, and then no parameters exist at all.
      self.q_bias_NxH = param(rngs, (n, h), ("heads", "kv"), 0.0, pdt)
      self.k_bias_KxH = param(rngs, (k, h), ("kv_heads", "kv"), 0.0, pdt)
      self.v_bias_KxH = param(rngs, (k, h), ("kv_heads", "kv"), 0.0, pdt)

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache=None, cache_index=None,
               query_at_B=None):
    """Returns (output_BxTxD, updated cache or None).

    Without a cache S == T. With a cache `(k_BxKxHxS, v_BxKxSxH)` (see `KVCache`), this
    call's keys/values are written at slots [cache_index, cache_index + T) and attention
    runs over all S slots; `mask_BxTxS` says which slots each query may see.
    `query_at_B` (no cache): the output at that one position of each row only, [B, 1, D];
    keys and values still come from all T positions.
    """
    dt = self.dtype
    x = x_BxTxD.astype(dt)
    x_q, q_positions_BxT = x, positions_BxT
    if query_at_B is not None:
      x_q, q_positions_BxT = take_at(x, query_at_B), take_at(positions_BxT, query_at_B)
      mask_BxTxS = take_at(mask_BxTxS, query_at_B)
    q_BxTxNxH = jnp.einsum("BTD,DNH->BTNH", x_q, self.q_DxNxH[...].astype(dt))
    k_BxTxKxH = jnp.einsum("BTD,DKH->BTKH", x, self.k_DxKxH[...].astype(dt))
    v_BxTxKxH = jnp.einsum("BTD,DKH->BTKH", x, self.v_DxKxH[...].astype(dt))
    if self.qkv_bias:
      q_BxTxNxH = q_BxTxNxH + self.q_bias_NxH[...].astype(dt)
      k_BxTxKxH = k_BxTxKxH + self.k_bias_KxH[...].astype(dt)
      v_BxTxKxH = v_BxTxKxH + self.v_bias_KxH[...].astype(dt)
    q_BxTxNxH = rope(q_BxTxNxH, q_positions_BxT, self.theta, self.rope_scaling)
    k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, self.theta, self.rope_scaling)
    q_BxTxNxH = sharding.constrain(
        q_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None))

    if kv_cache is None:
      # jax.nn.dot_product_attention handles K < N (GQA) and keeps the softmax in float32;
      # fully masked rows (pad queries) get uniform weights, i.e. finite garbage, not NaN.
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_BxTxS[:, None])
      new_cache = None
    else:
      k_BxKxHxS, v_BxKxSxH = kv_cache
      k_BxKxHxS = jax.lax.dynamic_update_slice(
          k_BxKxHxS, k_BxTxKxH.transpose(0, 2, 3, 1).astype(k_BxKxHxS.dtype),
          (0, 0, 0, cache_index))
      v_BxKxSxH = jax.lax.dynamic_update_slice(
          v_BxKxSxH, v_BxTxKxH.transpose(0, 2, 1, 3).astype(v_BxKxSxH.dtype),
          (0, 0, cache_index, 0))
      out_BxTxNxH = cached_attention(q_BxTxNxH, k_BxKxHxS.astype(dt), v_BxKxSxH.astype(dt),
                                     mask_BxTxS)
      new_cache = (k_BxKxHxS, v_BxKxSxH)
    out_BxTxD = jnp.einsum("BTNH,NHD->BTD", out_BxTxNxH, self.o_NxHxD[...].astype(dt))
    return out_BxTxD, new_cache


def cached_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS):
  """`jax.nn.dot_product_attention`'s maths on the KV cache's own layouts.

  Query head n reads key/value head n // (N / K), as there (and as Hugging Face's
  repeat_kv). Written out because dot_product_attention wants [B, S, K, H] keys and values:
  feeding it the cache would transpose every layer's whole cache at every decode step.
  """
  b, t, n, h = q_BxTxNxH.shape
  k = k_BxKxHxS.shape[1]
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
  logits_BxKxGxTxS = jnp.einsum("BTKGH,BKHS->BKGTS", q_BxTxKxGxH, k_BxKxHxS,
                                preferred_element_type=jnp.float32) * (1.0 / math.sqrt(h))
  # Every query sees at least its own slot, so no row is fully masked here.
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS,
                               0.7 * jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxKxSxH.dtype)
  out_BxTxKxGxH = jnp.einsum("BKGTS,BKSH->BTKGH", probs_BxKxGxTxS, v_BxKxSxH)
  return out_BxTxKxGxH.reshape(b, t, n, h)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), the LLaMA feed-forward block."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d, f, std, pdt = cfg.d_model, cfg.mlp_dim, cfg.init_std, cfg.jnp_param_dtype
    self.dtype = cfg.jnp_dtype
    self.gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std, pdt)
    self.up_DxF = param(rngs, (d, f), ("embed", "mlp"), std, pdt)
    self.down_FxD = param(rngs, (f, d), ("mlp", "embed"), std, pdt)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = self.dtype
    x = x_BxTxD.astype(dt)
    gate_BxTxF = jnp.einsum("BTD,DF->BTF", x, self.gate_DxF[...].astype(dt))
    up_BxTxF = jnp.einsum("BTD,DF->BTF", x, self.up_DxF[...].astype(dt))
    h_BxTxF = sharding.constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF,
                                 ("activation_batch", "activation_length", "activation_mlp"))
    return jnp.einsum("BTF,FD->BTD", h_BxTxF, self.down_FxD[...].astype(dt))
