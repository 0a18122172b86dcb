"""The pieces of a LLaMA block: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Shapes are in the names: B batch, T query length, S key length (the KV cache), D d_model,
N query heads, K key/value heads, H head dim, F SwiGLU hidden, V vocab.
Parameters carry logical axis names only (see `rlhf_jax/sharding.py` for the mesh mapping).
Statistics that are sensitive to precision (RMS, RoPE angles, softmax) run in float32
whatever the compute dtype, as Hugging Face's LLaMA does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models import lora
from rlhf_jax.models.config import RopeScaling, TransformerConfig


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter tagged with its logical axes (std 0 gives zeros)."""
  value = std * jax.random.normal(rngs.params(), shape, dtype) if std else jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def dense(x: jax.Array, w: jax.Array, contract: int = 1, **dot_kwargs) -> jax.Array:
  """`x[..., *C] @ w[*C, *O]` (the last `contract` axes of x against the first of w) as one
  2-D matmul [prod(...), prod(C)] x [prod(C), prod(O)], reshaped back to [..., *O].

  The same maths as `jnp.einsum("BTD,DF->BTF", ...)`, but XLA:CPU lowers the 3-D einsum's
  backward (the weight gradient contracts over both B and T) with transposed copies of the
  activations; the flat matmul has none, which makes a SwiGLU block's forward + backward
  1.45x faster on CPU (benchmarks/README.md). The reshapes merge major axes only, so a batch-
  or head-sharded operand stays sharded the same way.
  """
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  if w.shape[:contract] != inner:
    raise ValueError(f"dense: x {x.shape} and w {w.shape} disagree on the contracted axes.")
  out = w.shape[contract:]
  y = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1), **dot_kwargs)
  return y.reshape(*lead, *out)


def project(x: jax.Array, w: nnx.Param, adapter: lora.Adapter | None, dtype,
            contract: int = 1) -> jax.Array:
  """`dense(x, w)` in `dtype`, plus the LoRA update of `w` when it has an adapter."""
  y = dense(x, w[...].astype(dtype), contract)
  return y if adapter is None else y + adapter(x)


def take_at(x_BxTx_, at: jax.Array | slice) -> jax.Array:
  """Some positions of every row, keeping the length axis: `at` is an index per row [B]
  (`x[b, at[b]]`, giving [B, 1, ...]) or a static slice of positions (`x[:, at]`)."""
  if isinstance(at, slice):
    return x_BxTx_[:, at]
  index = at.reshape((-1, 1) + (1,) * (x_BxTx_.ndim - 2))
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


class Rotary(NamedTuple):
  """cos and sin of every position's rotary angles, [B, T, H/2], float32; built once per
  forward (`rotary`) and shared by every layer's queries and keys."""
  cos_BxTxH2: jax.Array
  sin_BxTxH2: jax.Array

  def at(self, at: jax.Array | slice) -> "Rotary":
    return Rotary(take_at(self.cos_BxTxH2, at), take_at(self.sin_BxTxH2, at))


def rotary(positions_BxT: jax.Array, head_dim: int, theta: float,
           scaling: RopeScaling | None = None, max_position: int | None = None) -> Rotary:
  """The angles of `positions_BxT` (all < `max_position`, default T), looked up in a table.

  The cos/sin table of positions 0 .. max_position-1 is computed at trace time, so the
  compiled program only gathers from a constant. Computing sin/cos in the program instead
  lets XLA fuse (duplicate) them into every consumer: per layer, per head, forward and
  backward: those fusions were ~9% of the XLA op time of a CPU PPO iteration (profiled).
  """
  n = positions_BxT.shape[1] if max_position is None else max_position
  with jax.ensure_compile_time_eval():
    inv_freq_H2 = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is not None:
      inv_freq_H2 = scale_inv_freq(inv_freq_H2, scaling)
    angles_NxH2 = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq_H2
    cos_NxH2, sin_NxH2 = jnp.cos(angles_NxH2), jnp.sin(angles_NxH2)
  return Rotary(jnp.take(cos_NxH2, positions_BxT, axis=0, mode="clip"),
                jnp.take(sin_NxH2, positions_BxT, axis=0, mode="clip"))


def apply_rope(x_BxTxNxH: jax.Array, rot: Rotary) -> jax.Array:
  """Rotary embedding in the Hugging Face LLaMA layout (rotate-half, not interleaved):
  the first and second halves of each head are the two coordinates of H/2 rotations."""
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  cos, sin = rot.cos_BxTxH2[:, :, None], rot.sin_BxTxH2[:, :, None]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float,
         scaling: RopeScaling | None = None) -> jax.Array:
  """`apply_rope` with the angles of `positions_BxT` (one-off use; models share a `Rotary`)."""
  return apply_rope(x_BxTxNxH, rotary(positions_BxT, x_BxTxNxH.shape[-1], theta, scaling))


class Attention(nnx.Module):
  """Causal self-attention with grouped-query heads and an optional KV cache."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    std, pdt = cfg.init_std, cfg.jnp_param_dtype
    self.dtype = cfg.jnp_dtype
    self.attention_impl = cfg.attention_impl  # "xla" | "cudnn" | "auto": see attention_kernel
    self.q_DxNxH = param(rngs, (d, n, h), ("embed", "heads", "kv"), std, pdt)
    self.k_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std, pdt)
    self.v_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"), std, pdt)
    self.o_NxHxD = param(rngs, (n, h, d), ("heads", "kv", "embed"), std, pdt)
    self.q_lora, self.k_lora, self.v_lora, self.o_lora = (
        lora.adapter(cfg.lora, t, w) for t, w in
        (("q", self.q_DxNxH), ("k", self.k_DxKxH), ("v", self.v_DxKxH), ("o", self.o_NxHxD)))
    self.qkv_bias = cfg.qkv_bias
    if cfg.qkv_bias:  # Qwen2-style; off by default, and then no parameters exist at all.
      self.q_bias_NxH = param(rngs, (n, h), ("heads", "kv"), 0.0, pdt)
      self.k_bias_KxH = param(rngs, (k, h), ("kv_heads", "kv"), 0.0, pdt)
      self.v_bias_KxH = param(rngs, (k, h), ("kv_heads", "kv"), 0.0, pdt)

  def __call__(self, x_BxTxD, rot: Rotary, mask_BxTxS, kv_cache=None, cache_index=None,
               queries=None):
    """Returns (output_BxTxD, updated cache or None).

    `rot`: the rotary angles of the T positions (`rotary`, shared by all layers).
    Without a cache S == T. With a cache `(k_BxKxHxS, v_BxKxSxH)` (see `KVCache`), this
    call's keys/values are written at slots [cache_index, cache_index + T) and attention
    runs over all S slots; `mask_BxTxS` says which slots each query may see.
    `queries` (no cache): the output at these positions only (`take_at`: an index per row,
    [B, 1, D], or a static slice); keys and values still come from all T positions.
    """
    dt = self.dtype
    x = x_BxTxD.astype(dt)
    x_q, q_rot = x, rot
    if queries is not None:
      x_q, q_rot = take_at(x, queries), rot.at(queries)
      mask_BxTxS = take_at(mask_BxTxS, queries)
    q_BxTxNxH = project(x_q, self.q_DxNxH, self.q_lora, dt)
    k_BxTxKxH = project(x, self.k_DxKxH, self.k_lora, dt)
    v_BxTxKxH = project(x, self.v_DxKxH, self.v_lora, dt)
    if self.qkv_bias:
      q_BxTxNxH = q_BxTxNxH + self.q_bias_NxH[...].astype(dt)
      k_BxTxKxH = k_BxTxKxH + self.k_bias_KxH[...].astype(dt)
      v_BxTxKxH = v_BxTxKxH + self.v_bias_KxH[...].astype(dt)
    q_BxTxNxH = apply_rope(q_BxTxNxH, q_rot)
    k_BxTxKxH = apply_rope(k_BxTxKxH, rot)
    q_BxTxNxH = sharding.constrain(
        q_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None))

    if kv_cache is None:
      # A subset of queries (`queries`: the last block of an RM / log-prob forward) is not
      # the causal square cuDNN's kernel wants; it is one block's few rows, so XLA runs it.
      kernel = "xla" if queries is not None else attention_kernel(
          self.attention_impl, q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], q_BxTxNxH.shape[1])
      out_BxTxNxH = self_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxS, kernel)
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
    out_BxTxD = project(out_BxTxNxH, self.o_NxHxD, self.o_lora, dt, contract=2)
    return out_BxTxD, new_cache


def cudnn_unsupported(dtype, head_dim: int, length: int) -> str | None:
  """Why cuDNN flash attention (as `self_attention` calls it) cannot run here, or None."""
  if jax.default_backend() != "gpu":
    return f"it needs an NVIDIA GPU and the backend is {jax.default_backend()!r}"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"it needs model.dtype bfloat16 or float16, got {jnp.dtype(dtype).name}"
  h_max = 256 if float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= 9 else 128
  if head_dim % 8 or head_dim > h_max:  # JAX's check_is_flash_attention
    return f"it needs a head dim that is a multiple of 8 and <= {h_max}, got {head_dim}"
  if length % 2:  # cuDNN's backward with a bias (our mask) needs even lengths
    return f"it needs an even sequence length with a mask, got {length}"
  return None


_AUTO_NOTED: set = set()


def attention_kernel(impl: str, dtype, head_dim: int, length: int) -> str:
  """The kernel ("xla" or "cudnn") that `model.attention_impl` = `impl` picks for a causal
  self-attention of `length` tokens, decided at trace time. "cudnn" where it cannot run is
  an error; "auto" then falls back to "xla" and logs why, once per reason."""
  if impl == "xla":
    return "xla"
  why = cudnn_unsupported(dtype, head_dim, length)
  if why is None:
    return "cudnn"
  if impl == "cudnn":
    raise ValueError(f"model.attention_impl='cudnn': {why}; use attention_impl='auto' (falls "
                     "back to xla) or 'xla'.")
  if why not in _AUTO_NOTED:
    _AUTO_NOTED.add(why)
    logging.info("model.attention_impl='auto': XLA attention, not cuDNN, since %s.", why)
  return "xla"


def mask_bias(mask_BxTxS: jax.Array, dtype) -> jax.Array:
  """A boolean attention mask as the additive bias cuDNN takes: 0 where seen, a large
  negative number elsewhere. The numbers are JAX's own for cuDNN (`combine_bias_and_mask`:
  -2^41 in bfloat16, -2^15 in float16, to dodge a cuDNN bug with two large negatives)."""
  big = -2 << 14 if jnp.dtype(dtype) == jnp.float16 else -2 << 40
  return jnp.where(mask_BxTxS, jnp.zeros((), dtype), jnp.asarray(big, dtype))


def self_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxS, kernel: str = "xla"):
  """Causal self-attention without a KV cache (S == T), grouped-query heads, by `kernel`.

  "xla": `jax.nn.dot_product_attention` with our boolean mask; it handles K < N (GQA) and
  keeps the softmax in float32; every query sees at least its own slot (see
  transformer.self_attention_mask), so no row is fully masked.
  "cudnn": cuDNN flash attention. Its own padding mask (query/key lengths) masks the keys
  past a length, i.e. right padding only: our prompts are left padded and packed rows hold
  several segments, so lengths cannot say which keys a query sees. The whole mask goes in as
  a bias [B, 1, T, S] instead (exact: masked logits get -2^41, their softmax weight is 0),
  with `is_causal` so cuDNN still skips the blocks above the diagonal. Costs: the bias
  (B*T*S*2 bytes, shared by the layers) and the unused bias gradient cuDNN's backward writes.
  "cudnn-inputs": those same inputs through XLA, what tests check on CPU.
  """
  if kernel == "xla":
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                        mask=mask_BxTxS[:, None])
  bias_Bx1xTxS = mask_bias(mask_BxTxS, q_BxTxNxH.dtype)[:, None]
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, bias=bias_Bx1xTxS, is_causal=True,
      implementation="xla" if kernel == "cudnn-inputs" else "cudnn")


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
    self.gate_lora, self.up_lora, self.down_lora = (
        lora.adapter(cfg.lora, t, w) for t, w in
        (("gate", self.gate_DxF), ("up", self.up_DxF), ("down", self.down_FxD)))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = self.dtype
    x = x_BxTxD.astype(dt)
    gate_BxTxF = project(x, self.gate_DxF, self.gate_lora, dt)
    up_BxTxF = project(x, self.up_DxF, self.up_lora, dt)
    h_BxTxF = sharding.constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF,
                                 ("activation_batch", "activation_length", "activation_mlp"))
    return project(h_BxTxF, self.down_FxD, self.down_lora, dt)
