"""The decoder trunk shared by the policy, value and reward networks.

    tokens -> embed -> num_layers x [x + attn(norm(x)); x + swiglu(norm(x))] -> norm -> h

(with `model.moe.num_experts > 0`, every `moe_every`-th SwiGLU is a sparse MoE, see moe.py)

Padding is described by `mask_BxT` (1 = real token, 0 = pad). Position ids come from the
mask, so a left-padded prompt gives every real token the same position, hence the same
output, as the unpadded prompt. The optional `KVCache` makes the same code path serve a
full forward, a prefill and one-token decode steps. A packed row (several examples back to
back, `data/packing.py`) adds `segment_ids_BxT` (1, 2, ... per example, 0 = pad) and
`positions_BxT` (restarting at 0 per example): tokens attend within their own example only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.layers import Attention, RMSNorm, Rotary, SwiGLU, param, rotary, take_at
from rlhf_jax.models.moe import MoE


class KVCache(NamedTuple):
  """Preallocated keys/values for every layer, plus the bookkeeping of what is filled.

  The caller sizes it: writing past `S` slots is not detected inside jit (XLA clamps the
  write), so allocate prompt length + max new tokens, as `sampling.py` does.
  """

  # Keys slot-minor and values slot-major are the layouts the two attention matmuls read
  # directly, so a decode step writes one slot in place with no transposed copy of the cache.
  k: tuple[jax.Array, ...]  # per layer, [B, K, H, S]
  v: tuple[jax.Array, ...]  # per layer, [B, K, S, H]
  key_mask_BxS: jax.Array  # bool: slot holds a real (non-pad) token
  index: jax.Array  # int32 scalar: next slot to write
  next_position_B: jax.Array  # int32: position id of each row's next real token


def init_cache(cfg: TransformerConfig, batch: int, max_len: int) -> KVCache:
  k, h = cfg.num_kv_heads, cfg.resolved_head_dim
  zeros = lambda shape: jnp.zeros(shape, cfg.jnp_dtype)
  return KVCache(
      k=tuple(zeros((batch, k, h, max_len)) for _ in range(cfg.num_layers)),
      v=tuple(zeros((batch, k, max_len, h)) for _ in range(cfg.num_layers)),
      key_mask_BxS=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32),
      next_position_B=jnp.zeros((batch,), jnp.int32),
  )


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
  """0, 1, 2, ... over real tokens; pads get the position of the next real token (unused)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def self_attention_mask(mask_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None
                        ) -> jax.Array:
  """Which keys each query may see in a forward without a KV cache, [B, T, T] bool.

  Causal, over real keys, and with segment ids over keys of the query's own segment only
  (a packed row's examples never see each other). Every query also sees its own slot, so a
  pad query attends to itself alone: its (unused) output stays causal and finite instead of
  averaging over future keys.
  """
  t = mask_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  keys_BxTxS = mask_BxT[:, None, :]
  if segment_ids_BxT is not None:
    keys_BxTxS = keys_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  return causal_TxT[None] & (keys_BxTxS | jnp.eye(t, dtype=bool)[None])


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
  """Index of the last real token of each row; works for left and right padding."""
  t = mask_BxT.shape[-1]
  return t - 1 - jnp.argmax(mask_BxT[:, ::-1].astype(jnp.int32), axis=-1)


class Block(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MoE(cfg, rngs, layer) if cfg.moe.is_moe_layer(layer) else SwiGLU(cfg, rngs)

  def __call__(self, x_BxTxD, rot: Rotary, mask_BxTxS, kv_cache=None, cache_index=None,
               token_mask_BxT=None, queries=None):
    """(x_BxTxD, updated cache or None); with `queries` (see `Attention`), x at those
    positions only."""
    attn_BxTxD, kv = self.attn(self.attn_norm(x_BxTxD), rot, mask_BxTxS,
                               kv_cache, cache_index, queries)
    if queries is not None:
      x_BxTxD = take_at(x_BxTxD, queries)
      if token_mask_BxT is not None:
        token_mask_BxT = take_at(token_mask_BxT, queries)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h_BxTxD = self.mlp_norm(x_BxTxD)
    if isinstance(self.mlp, MoE):
      # Pads take no expert capacity. Generation (a KV cache) records no aux losses: nothing
      # trains on them, and the decode loop's `lax.scan` may not mutate the module.
      x_BxTxD = x_BxTxD + self.mlp(h_BxTxD, token_mask_BxT, record=kv_cache is None)
    else:
      x_BxTxD = x_BxTxD + self.mlp(h_BxTxD)
    return sharding.constrain(
        x_BxTxD, ("activation_batch", "activation_length", "activation_embed")), kv


class Transformer(nnx.Module):
  """Embedding, blocks and final norm: returns hidden states, not logits (see heads.py)."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.init_std, cfg.jnp_param_dtype)
    self.blocks = nnx.List([Block(cfg, rngs, i) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array, cache: KVCache | None = None,
               last_only: bool = False, keep: slice | None = None,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Hidden states [B, T, D] and the updated cache (None without one).

    With a cache, the T tokens are appended after the `cache.index` slots already filled
    (T = prompt length for a prefill, 1 for a decode step).
    `last_only` (no cache): the hidden state of each row's last real token only, [B, 1, D],
    which is all a reward model reads. The last block then runs its query, attention output
    and MLP for that token alone (a fifth of an RM step's FLOPs at 4 layers).
    `keep` (no cache): a static slice of positions, e.g. the ones that predict a response;
    the hidden states of those only, with the same saving in the last block.
    `segment_ids_BxT`, `positions_BxT` (no cache): a packed row; each token attends to its
    own segment only, at the given positions (the default ones come from `mask_BxT`).
    """
    mask_BxT = mask_BxT.astype(bool)
    t = tokens_BxT.shape[1]
    if cache is None:
      if segment_ids_BxT is not None and positions_BxT is None:
        raise ValueError("Transformer: segment_ids_BxT needs positions_BxT (each segment's "
                         "positions restart at 0; see data/packing.py).")
      attn_mask_BxTxS = self_attention_mask(mask_BxT, segment_ids_BxT)
      if positions_BxT is None:
        positions_BxT = positions_from_mask(mask_BxT)
      index = None
    elif segment_ids_BxT is not None or positions_BxT is not None:
      raise ValueError("Transformer: segment ids and positions are for a full forward; a KV "
                       "cache tracks its own positions.")
    else:
      index = cache.index
      positions_BxT = cache.next_position_B[:, None] + positions_from_mask(mask_BxT)
      key_mask_BxS = jax.lax.dynamic_update_slice(cache.key_mask_BxS, mask_BxT, (0, index))
      s = key_mask_BxS.shape[1]
      # Query t sits in slot index + t and sees every filled slot up to its own.
      slot_TxS = jnp.arange(s)[None, :] - (index + jnp.arange(t)[:, None])
      attn_mask_BxTxS = ((slot_TxS <= 0)[None] & key_mask_BxS[:, None, :]) | (slot_TxS == 0)[None]

    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.cfg.jnp_dtype)
    x_BxTxD = sharding.constrain(
        x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    wanted = None  # the positions whose hidden states are returned: an index per row or a slice
    if last_only or keep is not None:
      if cache is not None or (last_only and keep is not None):
        raise ValueError("Transformer: last_only / keep are for a full forward without a KV "
                         "cache, and exclusive.")
      wanted = last_token_index(mask_BxT) if last_only else keep
    # Not through an MoE last block: its routing statistics (auxiliary losses) and its
    # capacity are over all the tokens, so it runs in full and the positions are picked after.
    queries = None if isinstance(self.blocks[-1].mlp, MoE) else wanted
    cfg = self.cfg
    # Positions are below the number of slots (T, or the cache's S).
    rot = rotary(positions_BxT, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling,
                 max_position=t if cache is None else cache.key_mask_BxS.shape[1])
    new_kv = []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      at = queries if i == len(self.blocks) - 1 else None
      x_BxTxD, kv = block(x_BxTxD, rot, attn_mask_BxTxS, kv, index, mask_BxT, at)
      new_kv.append(kv)
    if wanted is not None and queries is None:
      x_BxTxD = take_at(x_BxTxD, wanted)
    h_BxTxD = self.final_norm(x_BxTxD)

    if cache is None:
      return h_BxTxD, None
    new_k, new_v = zip(*new_kv)
    return h_BxTxD, KVCache(
        k=new_k, v=new_v, key_mask_BxS=key_mask_BxS, index=index + t,
        next_position_B=cache.next_position_B + mask_BxT.sum(axis=1, dtype=jnp.int32))
