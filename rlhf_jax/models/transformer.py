"""The decoder trunk shared by the policy, value and reward networks.

    tokens -> embed -> num_layers x [x + attn(norm(x)); x + swiglu(norm(x))] -> norm -> h

(with `model.moe.num_experts > 0`, every `moe_every`-th SwiGLU is a sparse MoE, see moe.py)

Padding is described by `mask_BxT` (1 = real token, 0 = pad). Position ids come from the
mask, so a left-padded prompt gives every real token the same position, hence the same
output, as the unpadded prompt. The optional `KVCache` makes the same code path serve a
full forward, a prefill and one-token decode steps. A packed row (several examples back to
back, `data/packing.py`) adds `segment_ids_BxT` (1, 2, ... per example, 0 = pad) and
`positions_BxT` (restarting at 0 per example): tokens attend within their own example only.

Scanned layers (`model.scan_layers`): the blocks' parameters are stacked on a leading
`layers` axis and applied by one `jax.lax.scan`, so the compiled program holds one block
and compile time no longer grows with depth. With MoE the scan steps over groups of
`moe_every` layers (the group's dense blocks, then its MoE block): `stacked_blocks[j]` holds
layers j, j + p, j + 2p, ... (p = `scan_period`). The weights are the unscanned model's
(same init, same values): `stack_layers` / `unstack_layers` convert a params tree between
the two layouts (HF import/export, tests). A scanned KV cache is one [L, ...] array per k/v
(the sampler decodes from an `unscanned` copy instead: see there). In a scanned full forward
every block runs on all positions and `last_only` / `keep` pick positions after the last one
(the unscanned model runs its last block for them alone: 1/L of the trunk's FLOPs, which a
scan cannot skip without slicing the stacked weights).

Rematerialisation (`model.remat`, `REMAT_POLICIES`): each block of a forward without a KV
cache is a `jax.checkpoint`, so the backward pass recomputes what its policy does not save;
a forward that is never differentiated computes the same values either way. Use it with
`scan_layers`: unrolled, XLA may schedule the recomputation inside the forward pass, and
XLA:CPU does (22 layers, d_model 256: 1435 MiB of temporaries with "full", 1556 MiB without;
scanned, 127 MiB; `python -m benchmarks.scan_remat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.layers import Attention, RMSNorm, Rotary, SwiGLU, param, rotary, take_at
from rlhf_jax.models.moe import MoE, MoEStats

# model.remat -> what a block saves for the backward pass ("none": no jax.checkpoint).
#   full           nothing but the block's input: the backward recomputes the whole block
#                  (activations ~ L x [B, T, D] + one block's).
#   dots_saveable  every matmul output (projections and attention's logits and output); the
#                  norms, RoPE, softmax and SwiGLU's elementwise ops are recomputed.
#   minimal        the projection outputs only (q, k, v, o, gate, up, down: matmuls with no
#                  batch dims); attention's batched dots and everything elementwise are
#                  recomputed (MaxText's "minimal"). The attention logits are the one
#                  activation that grows with T^2, and the cheapest matmuls to redo.
# Measured (22 layers, d_model 256, T 256, CPU, scanned): XLA's temporaries 127 / 474 / 704 /
# 1689 MiB for full / minimal / dots_saveable / none.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
  """Preallocated keys/values for every layer, plus the bookkeeping of what is filled.

  The caller sizes it: writing past `S` slots is not detected inside jit (XLA clamps the
  write), so allocate prompt length + max new tokens, as `sampling.py` does.
  """

  # Keys slot-minor and values slot-major are the layouts the two attention matmuls read
  # directly, so a decode step writes one slot in place with no transposed copy of the cache.
  k: tuple[jax.Array, ...] | jax.Array  # per layer, [B, K, H, S]; scanned: [L, B, K, H, S]
  v: tuple[jax.Array, ...] | jax.Array  # per layer, [B, K, S, H]; scanned: [L, B, K, S, H]
  key_mask_BxS: jax.Array  # bool: slot holds a real (non-pad) token
  index: jax.Array  # int32 scalar: next slot to write
  next_position_B: jax.Array  # int32: position id of each row's next real token

  def repeat_rows(self, n: int) -> "KVCache":
    """Each row repeated `n` times in place (row b -> rows b n .. b n + n - 1)."""
    rows = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
    stacked = not isinstance(self.k, tuple)
    kv = lambda c: rows(c, 1) if stacked else tuple(rows(x) for x in c)
    return KVCache(kv(self.k), kv(self.v), rows(self.key_mask_BxS), self.index,
                   rows(self.next_position_B))


def init_cache(cfg: TransformerConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache in the layout the model reads: per-layer tuples, or with
  `cfg.scan_layers` one stacked [L, ...] array per k/v."""
  k, h, n = cfg.num_kv_heads, cfg.resolved_head_dim, cfg.num_layers
  zeros = lambda shape: jnp.zeros(shape, cfg.jnp_dtype)
  if cfg.scan_layers:
    keys, values = zeros((n, batch, k, h, max_len)), zeros((n, batch, k, max_len, h))
  else:
    keys = tuple(zeros((batch, k, h, max_len)) for _ in range(n))
    values = tuple(zeros((batch, k, max_len, h)) for _ in range(n))
  return KVCache(k=keys, v=values, key_mask_BxS=jnp.zeros((batch, max_len), bool),
                 index=jnp.zeros((), jnp.int32), next_position_B=jnp.zeros((batch,), jnp.int32))


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


# --- Scanned layers: the stacked layout ------------------------------------------------------

def scan_period(cfg: TransformerConfig) -> int:
  """Layers per scan step: `moe.moe_every` with MoE (one MoE block per step), else 1."""
  return cfg.moe.moe_every if cfg.moe.num_experts else 1


def _stack(*xs):
  """Arrays stacked on a new leading axis: numpy stays numpy (host-side conversions)."""
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def stack_layers(cfg: TransformerConfig, blocks: Mapping[Any, Any]) -> dict[int, Any]:
  """{layer i: params tree} (int or str keys) -> {j: the trees of layers j, j + p, ...
  stacked on a leading axis}, the `stacked_blocks` of a scanned trunk (p = `scan_period`)."""
  per_layer = {int(i): tree for i, tree in blocks.items()}
  if sorted(per_layer) != list(range(cfg.num_layers)):
    raise ValueError(f"stack_layers: blocks {sorted(per_layer)[:8]}... are not layers "
                     f"0..{cfg.num_layers - 1} of model.num_layers={cfg.num_layers}.")
  p = scan_period(cfg)
  return {j: jax.tree.map(_stack, *(per_layer[i] for i in range(j, cfg.num_layers, p)))
          for j in range(p)}


def unstack_layers(cfg: TransformerConfig, stacked: Mapping[Any, Any]) -> dict[int, Any]:
  """The inverse of `stack_layers`: {layer i: params tree}."""
  stacked = {int(j): tree for j, tree in stacked.items()}
  p = scan_period(cfg)
  if sorted(stacked) != list(range(p)):
    raise ValueError(f"unstack_layers: stacked blocks {sorted(stacked)} are not 0..{p - 1} "
                     f"(scan period {p}: model.moe.moe_every with MoE, else 1).")
  return {i: jax.tree.map(lambda x, g=i // p: x[g], stacked[i % p])
          for i in range(cfg.num_layers)}


def per_layer_trunk(cfg: TransformerConfig, trunk: Mapping[str, Any]) -> dict[str, Any]:
  """A trunk's pure-dict params with per-layer `blocks` (unstacked if it is scanned)."""
  trunk = dict(trunk)
  if "stacked_blocks" in trunk:
    trunk["blocks"] = unstack_layers(cfg, trunk.pop("stacked_blocks"))
  return trunk


def scanned_trunk(cfg: TransformerConfig, trunk: Mapping[str, Any]) -> dict[str, Any]:
  """A trunk's pure-dict params with `stacked_blocks` (stacked if it is per-layer)."""
  trunk = dict(trunk)
  if "blocks" in trunk:
    trunk["stacked_blocks"] = stack_layers(cfg, trunk.pop("blocks"))
  return trunk


def trunk_for(cfg: TransformerConfig, trunk: Mapping[str, Any]) -> dict[str, Any]:
  """A trunk's pure-dict params in the layout `cfg` builds (`cfg.scan_layers`)."""
  return scanned_trunk(cfg, trunk) if cfg.scan_layers else per_layer_trunk(cfg, trunk)


def unscanned(model: nnx.Module) -> nnx.Module:
  """A network with a scanned trunk (`model.trunk`, `model.cfg.scan_layers`) rebuilt with
  per-layer blocks holding slices of its stacked weights; any other network as it is.

  For generation: a decode step of a scanned trunk slices every layer's weights out of the
  stacked arrays, and XLA:CPU copies each slice, at every step: the sampler was 2.2x slower
  (8 layers, d_model 512, 32 new tokens). Slicing once per call costs one copy of the
  weights for as long as it runs (memory.py counts it), as MaxText decodes unscanned.
  """
  cfg = getattr(model, "cfg", None)
  if cfg is None or not cfg.scan_layers:
    return model
  flat_cfg = dataclasses.replace(cfg, scan_layers=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(flat_cfg, nnx.Rngs(0))))
  pure = nnx.to_pure_dict(nnx.state(model))
  pure["trunk"] = per_layer_trunk(cfg, pure["trunk"])
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _stack_modules(blocks: Sequence[nnx.Module]) -> nnx.Module:
  """One module whose every variable is the blocks' stacked on a leading axis, its logical
  axes prefixed with `layers` (so `sharding.param_shardings` leaves that axis whole)."""
  graphdef, _ = nnx.split(blocks[0])
  states = [nnx.split(b)[1] for b in blocks]

  def stack(*vs):
    out = vs[0].replace(jnp.stack([v.get_value() for v in vs]))
    axes = vs[0].get_metadata().get("logical_axes")
    return out if axes is None else out.replace(logical_axes=("layers", *axes))

  state = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


# --- Blocks ----------------------------------------------------------------------------------

class BlockInputs(NamedTuple):
  """What every block of a forward reads besides the residual stream."""
  rot: Rotary
  attn_mask_BxTxS: jax.Array
  token_mask_BxT: jax.Array


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


def _run_blocks(blocks: Sequence[Block], x_BxTxD, inputs: BlockInputs, first_layer=None,
                queries=None):
  """(x after `blocks` in order on a full forward, the MoE statistics each MoE block recorded).

  `first_layer` (a scan's traced group start) sets each MoE block's layer index, which keys
  its router jitter; `queries` go to the last block."""
  stats = []
  for j, block in enumerate(blocks):
    is_moe = isinstance(block.mlp, MoE)
    if is_moe and first_layer is not None:
      block.mlp.layer = first_layer + j
    at = queries if j == len(blocks) - 1 else None
    x_BxTxD, _ = block(x_BxTxD, inputs.rot, inputs.attn_mask_BxTxS, None, None,
                       inputs.token_mask_BxT, at)
    if is_moe:
      stats.append(block.mlp.stats.get_value()[-1])
  return x_BxTxD, tuple(stats)


def _pure_blocks(graphdef, stats_state, state, x_BxTxD, inputs, first_layer=None, queries=None):
  """`_run_blocks` as a pure function of the blocks' (split) state: what `jax.checkpoint` and
  the scan body wrap. `stats_state`: MoE statistics not yet popped (the merged copy needs
  them: copies, as merging shares Variable objects and the outer ones are not this trace's)."""
  merged = nnx.merge(graphdef, jax.tree.map(lambda x: x, stats_state), state)
  blocks = list(merged) if isinstance(merged, nnx.List) else [merged]
  return _run_blocks(blocks, x_BxTxD, inputs, first_layer, queries)


def _attach_stats(mlp: MoE, stats: dict) -> None:
  """Records `stats` on `mlp` as its own call would have (`moe.aux_loss` pops them)."""
  if hasattr(mlp, "stats"):
    mlp.stats.set_value(mlp.stats.get_value() + (stats,))
  else:
    mlp.stats = MoEStats((stats,))


def _remat(fn, cfg: TransformerConfig, in_scan: bool = False):
  """`fn` under `jax.checkpoint` with `cfg.remat`'s policy ("none": `fn` itself). Inside a
  scan, `prevent_cse=False`: the scan already keeps XLA from merging the recomputation into
  the forward (JAX's recommendation), and the barriers would cost fusion."""
  if cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not in_scan)


class Transformer(nnx.Module):
  """Embedding, blocks and final norm: returns hidden states, not logits (see heads.py)."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.init_std, cfg.jnp_param_dtype)
    # Built layer by layer in both layouts (same random draws, so the same weights).
    blocks = [Block(cfg, rngs, i) for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      p = scan_period(cfg)
      self.stacked_blocks = nnx.List([_stack_modules(blocks[j::p]) for j in range(p)])
    else:
      self.blocks = nnx.List(blocks)
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
    and MLP for that token alone (a fifth of an RM step's FLOPs at 4 layers; not scanned).
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
    cfg = self.cfg
    # Positions are below the number of slots (T, or the cache's S).
    rot = rotary(positions_BxT, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling,
                 max_position=t if cache is None else cache.key_mask_BxS.shape[1])
    inputs = BlockInputs(rot, attn_mask_BxTxS, mask_BxT)
    # Not through an MoE last block: its routing statistics (auxiliary losses) and its
    # capacity are over all the tokens, so it runs in full and the positions are picked after.
    # Nor through a scan, whose steps all have one shape.
    last_moe = cfg.moe.is_moe_layer(cfg.num_layers - 1)
    queries = None if last_moe or cfg.scan_layers else wanted
    if cfg.scan_layers:
      x_BxTxD, new_kv = self._scan(x_BxTxD, inputs, cache, index)
    else:
      x_BxTxD, new_kv = self._loop(x_BxTxD, inputs, cache, index, queries)
    if wanted is not None and queries is None:
      x_BxTxD = take_at(x_BxTxD, wanted)
    h_BxTxD = self.final_norm(x_BxTxD)

    if cache is None:
      return h_BxTxD, None
    new_k, new_v = new_kv
    return h_BxTxD, KVCache(
        k=new_k, v=new_v, key_mask_BxS=key_mask_BxS, index=index + t,
        next_position_B=cache.next_position_B + mask_BxT.sum(axis=1, dtype=jnp.int32))

  def _loop(self, x_BxTxD, inputs: BlockInputs, cache, index, queries):
    """The unscanned blocks, one after the other: (x, (keys, values) per layer or None)."""
    last = len(self.blocks) - 1
    if cache is not None:
      new_kv = []
      for i, block in enumerate(self.blocks):
        x_BxTxD, kv = block(x_BxTxD, inputs.rot, inputs.attn_mask_BxTxS,
                            (cache.k[i], cache.v[i]), index, inputs.token_mask_BxT)
        new_kv.append(kv)
      return x_BxTxD, tuple(zip(*new_kv))
    for i, block in enumerate(self.blocks):
      at = queries if i == last else None
      if self.cfg.remat == "none":
        x_BxTxD, _ = block(x_BxTxD, inputs.rot, inputs.attn_mask_BxTxS, None, None,
                           inputs.token_mask_BxT, at)
        continue
      graphdef, stats_state, state = nnx.split(block, MoEStats, ...)
      fn = _remat(lambda s, x, b, g=graphdef, st=stats_state, at=at:
                  _pure_blocks(g, st, s, x, b, None, at), self.cfg)
      x_BxTxD, stats = fn(state, x_BxTxD, inputs)
      for s in stats:
        _attach_stats(block.mlp, s)
    return x_BxTxD, None

  def _scan(self, x_BxTxD, inputs: BlockInputs, cache, index):
    """The stacked blocks in one `lax.scan` over groups of `scan_period` layers:
    (x, (keys, values) [L, ...] or None)."""
    cfg = self.cfg
    p = scan_period(cfg)
    graphdef, stats_state, state = nnx.split(self.stacked_blocks, MoEStats, ...)
    group_G = jnp.arange(cfg.num_layers // p)
    if cache is None:
      fn = _remat(lambda s, x, b, g: _pure_blocks(graphdef, stats_state, s, x, b, g * p),
                  cfg, in_scan=True)
      x_BxTxD, stats_G = jax.lax.scan(lambda x, xs: fn(xs[0], x, inputs, xs[1]),
                                      x_BxTxD, (state, group_G))
      moe_blocks = [b for b in self.stacked_blocks if isinstance(b.mlp, MoE)]
      for block, s in zip(moe_blocks, stats_G):  # each stat with a leading [groups] axis
        _attach_stats(block.mlp, s)
      return x_BxTxD, None

    def step(carry, xs):
      x_BxTxD, k_LxBxKxHxS, v_LxBxKxSxH = carry
      state_g, g = xs
      for j, block in enumerate(nnx.merge(graphdef, jax.tree.map(lambda x: x, stats_state),
                                          state_g)):
        i = g * p + j
        if isinstance(block.mlp, MoE):
          block.mlp.layer = i
        # The whole cache is carried and each layer's slice updated in it: as the scan's
        # input and output (xs / ys), it would be held twice.
        kv = (jax.lax.dynamic_index_in_dim(k_LxBxKxHxS, i, keepdims=False),
              jax.lax.dynamic_index_in_dim(v_LxBxKxSxH, i, keepdims=False))
        x_BxTxD, (k_BxKxHxS, v_BxKxSxH) = block(x_BxTxD, inputs.rot, inputs.attn_mask_BxTxS,
                                                kv, index, inputs.token_mask_BxT)
        k_LxBxKxHxS = jax.lax.dynamic_update_index_in_dim(k_LxBxKxHxS, k_BxKxHxS, i, 0)
        v_LxBxKxSxH = jax.lax.dynamic_update_index_in_dim(v_LxBxKxSxH, v_BxKxSxH, i, 0)
      return (x_BxTxD, k_LxBxKxHxS, v_LxBxKxSxH), None

    (x_BxTxD, k, v), _ = jax.lax.scan(step, (x_BxTxD, cache.k, cache.v), (state, group_G))
    return x_BxTxD, (k, v)
