"""Sparse Mixture-of-Experts feed-forward: a float32 top-k router over SwiGLU experts.

    probs = softmax(x W_router)              over all E experts, in float32
    y(x)  = sum_j gate_j * expert_{e_j}(x)   e_j the top-k experts; top-2 gates renormalised

Two ways to send tokens to their experts (`MoEConfig.dropless`):

* Capacity (GShard / Switch). Each sequence is a group of T tokens; an expert takes at most
  C = max(min_capacity, round(factor * T * k / E)) of the group's assignments: all first
  choices before any second choice, earlier tokens first, pads take no slot. Assignments past
  C are dropped: that expert adds nothing, and a token with every choice dropped passes
  through the residual unchanged. Dispatch and combine are one-hot einsums over [B, T, E, C],
  which run and shard on every backend (expert buffers are split over the `exp` axis).
* Dropless: the B*T*k assignments are sorted by expert and each expert's run is one
  `jax.lax.ragged_dot`. Nothing is dropped, so a token's output does not depend on the tokens
  it is routed with: a one-token decode step gives exactly the full forward's output, which
  PPO needs (sampler, experience pass and training forward must agree on log-probs).

Train vs eval: `deterministic` is False at construction (train: `train_capacity_factor`,
router jitter); `model.eval()` sets it on every MoE layer (eval capacity factor, no jitter),
`model.train()` resets it. Inference paths (sampler, eval loss, RM scoring) call `eval()`.

Auxiliary losses are recorded, not returned: a forward without a KV cache stores each MoE
call's statistics on its layer as an `MoEStats` variable, and `aux_loss(model)` pops them
after the forward, inside the loss function. So no forward signature changes, a loss that
never calls `aux_loss` just discards them with its merged model, and generation (KV cache,
inside `lax.scan`) records nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import MoEConfig, TransformerConfig
from rlhf_jax.models.layers import param

ROUTER_INIT_STD = 0.02  # Switch / ST-MoE: a small router init keeps early routing near uniform.


class MoEStats(nnx.Intermediate):
  """Routing statistics of an MoE layer: a tuple with one dict per call (see `aux_loss`)."""


def expert_capacity(cfg: MoEConfig, tokens_per_group: int, train: bool) -> int:
  """Slots per expert and group: max(min_capacity, round(factor * T * k / E)), at most T."""
  factor = cfg.train_capacity_factor if train else cfg.eval_capacity_factor
  c = max(cfg.min_capacity, round(factor * tokens_per_group * cfg.top_k / cfg.num_experts))
  # An expert gets at most one assignment per token, so slots beyond T would stay empty.
  return min(c, tokens_per_group)


def route(logits_BxTxE: jax.Array, top_k: int):
  """(probs_BxTxE, gates_BxTxK, experts_BxTxK): softmax over all experts, then top-k.

  Top-2 gates are renormalised to sum to 1; a top-1 gate stays the raw probability, else it
  would be constantly 1 and the router would get no gradient from the task loss (Switch).
  """
  probs_BxTxE = jax.nn.softmax(logits_BxTxE, axis=-1)
  top_BxTxK, experts_BxTxK = jax.lax.top_k(probs_BxTxE, top_k)
  gates_BxTxK = top_BxTxK / top_BxTxK.sum(-1, keepdims=True) if top_k > 1 else top_BxTxK
  return probs_BxTxE, gates_BxTxK, experts_BxTxK


def capacity_slots(experts_BxTxK: jax.Array, mask_BxT: jax.Array, num_experts: int,
                   capacity: int):
  """(slot_BxTxK, kept_BxTxK): each assignment's position in its expert's buffer, and
  whether it fits. A row is one group; its first choices queue before its second choices."""
  b, t, k = experts_BxTxK.shape
  onehot_BxTxKxE = (jax.nn.one_hot(experts_BxTxK, num_experts, dtype=jnp.int32)
                    * mask_BxT[:, :, None, None].astype(jnp.int32))
  # Queue order: choice-major, token-minor; an exclusive cumsum counts who is ahead.
  queue_BxKTxE = onehot_BxTxKxE.transpose(0, 2, 1, 3).reshape(b, k * t, num_experts)
  ahead_BxKTxE = jnp.cumsum(queue_BxKTxE, axis=1) - queue_BxKTxE
  ahead_BxTxKxE = ahead_BxKTxE.reshape(b, k, t, num_experts).transpose(0, 2, 1, 3)
  slot_BxTxK = (ahead_BxTxKxE * onehot_BxTxKxE).sum(-1)
  kept_BxTxK = (slot_BxTxK < capacity) & mask_BxT[:, :, None].astype(bool)
  return slot_BxTxK, kept_BxTxK


class MoE(nnx.Module):
  """Drop-in for `SwiGLU` in an MoE layer: E SwiGLU experts behind a top-k router."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
    m = cfg.moe
    d, e, f = cfg.d_model, m.num_experts, m.expert_mlp_dim or cfg.mlp_dim
    std, pdt = cfg.init_std, cfg.jnp_param_dtype
    self.cfg = m
    self.layer = layer
    self.dtype = cfg.jnp_dtype
    self.deterministic = False  # model.eval() / model.train() flip it.
    # float32 whatever param_dtype: routing decisions are discrete, and bf16 logits flip them.
    self.router_DxE = param(rngs, (d, e), ("embed", None), ROUTER_INIT_STD, jnp.float32)
    self.gate_ExDxF = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std, pdt)
    self.up_ExDxF = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std, pdt)
    self.down_ExFxD = param(rngs, (e, f, d), ("exp", "mlp", "embed"), std, pdt)

  def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None,
               record: bool = True) -> jax.Array:
    """The FFN output [B, T, D]. `mask_BxT` (1 = token): pads take no capacity and are left
    out of the statistics. `record`: store this call's `MoEStats` for `aux_loss`."""
    m = self.cfg
    b, t, _ = x_BxTxD.shape
    mask_BxT = jnp.ones((b, t), bool) if mask_BxT is None else mask_BxT.astype(bool)
    router_in_BxTxD = x_BxTxD.astype(jnp.float32)
    if m.router_jitter and not self.deterministic:
      router_in_BxTxD = router_in_BxTxD * self._jitter(router_in_BxTxD)
    logits_BxTxE = jnp.einsum("BTD,DE->BTE", router_in_BxTxD, self.router_DxE[...],
                              precision=jax.lax.Precision.HIGHEST)
    probs_BxTxE, gates_BxTxK, experts_BxTxK = route(logits_BxTxE, m.top_k)

    if m.dropless:
      # Pads are computed (static shapes) but, as in the capacity path, get a zero output.
      y_BxTxD = self._dropless(x_BxTxD, gates_BxTxK * mask_BxT[..., None], experts_BxTxK)
      kept_BxTxK = jnp.broadcast_to(mask_BxT[..., None], experts_BxTxK.shape)
    else:
      capacity = expert_capacity(m, t, train=not self.deterministic)
      slot_BxTxK, kept_BxTxK = capacity_slots(experts_BxTxK, mask_BxT, m.num_experts, capacity)
      y_BxTxD = self._with_capacity(x_BxTxD, gates_BxTxK, experts_BxTxK, slot_BxTxK,
                                    kept_BxTxK, capacity)
    if record:
      self._record(logits_BxTxE, probs_BxTxE, experts_BxTxK, kept_BxTxK, mask_BxT)
    return y_BxTxD

  def _experts(self, x_ExNxD: jax.Array) -> jax.Array:
    """Every expert's SwiGLU on its own [.., D] rows: [E, ..., D] -> [E, ..., D]."""
    dt = self.dtype
    gate_ExNxF = jnp.einsum("E...D,EDF->E...F", x_ExNxD, self.gate_ExDxF[...].astype(dt))
    up_ExNxF = jnp.einsum("E...D,EDF->E...F", x_ExNxD, self.up_ExDxF[...].astype(dt))
    h_ExNxF = jax.nn.silu(gate_ExNxF) * up_ExNxF
    return jnp.einsum("E...F,EFD->E...D", h_ExNxF, self.down_ExFxD[...].astype(dt))

  def _with_capacity(self, x_BxTxD, gates_BxTxK, experts_BxTxK, slot_BxTxK, kept_BxTxK,
                     capacity: int):
    dt = self.dtype
    expert_BxTxKxE = jax.nn.one_hot(experts_BxTxK, self.cfg.num_experts, dtype=dt)
    # A dropped assignment gets slot index `capacity`, whose one-hot row is all zeros.
    slot_BxTxKxC = jax.nn.one_hot(jnp.where(kept_BxTxK, slot_BxTxK, capacity), capacity, dtype=dt)
    dispatch_BxTxExC = jnp.einsum("BTKE,BTKC->BTEC", expert_BxTxKxE, slot_BxTxKxC)
    combine_BxTxExC = jnp.einsum("BTKE,BTKC,BTK->BTEC", expert_BxTxKxE, slot_BxTxKxC,
                                 gates_BxTxK.astype(dt))
    # Expert-major buffers: the expert dim claims the `expert` mesh axis first, the batch
    # keeps the rest, so moving tokens to their experts is an all-to-all over `expert`.
    axes = ("activation_exp", "activation_batch", None, "activation_embed")
    x_ExBxCxD = sharding.constrain(
        jnp.einsum("BTEC,BTD->EBCD", dispatch_BxTxExC, x_BxTxD.astype(dt)), axes)
    y_ExBxCxD = sharding.constrain(self._experts(x_ExBxCxD), axes)
    return jnp.einsum("BTEC,EBCD->BTD", combine_BxTxExC, y_ExBxCxD)

  def _dropless(self, x_BxTxD, gates_BxTxK, experts_BxTxK):
    dt = self.dtype
    b, t, d = x_BxTxD.shape
    k, e = experts_BxTxK.shape[-1], self.cfg.num_experts
    expert_N = experts_BxTxK.reshape(-1)  # assignment n belongs to token n // k
    order_N = jnp.argsort(expert_N, stable=True)
    x_NxD = jnp.take(x_BxTxD.astype(dt).reshape(b * t, d), order_N // k, axis=0)
    sizes_E = jnp.bincount(expert_N, length=e).astype(jnp.int32)
    gate_NxF = jax.lax.ragged_dot(x_NxD, self.gate_ExDxF[...].astype(dt), sizes_E)
    up_NxF = jax.lax.ragged_dot(x_NxD, self.up_ExDxF[...].astype(dt), sizes_E)
    y_NxD = jax.lax.ragged_dot(jax.nn.silu(gate_NxF) * up_NxF, self.down_ExFxD[...].astype(dt),
                               sizes_E)
    y_NxD = jnp.zeros_like(y_NxD).at[order_N].set(y_NxD)  # back to assignment order
    return jnp.einsum("BTKD,BTK->BTD", y_NxD.reshape(b, t, k, d), gates_BxTxK.astype(dt))

  def _jitter(self, x_BxTxD: jax.Array) -> jax.Array:
    """Multiplicative noise U(1 - eps, 1 + eps) for the router input.

    The key is derived from the input's bits (and the layer index), so the forward stays a
    pure function of (params, batch) and resume stays exact, yet every batch and layer draws
    different noise. Integer sums are exact, so the key is the same on any mesh.
    """
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x_BxTxD), jnp.uint32)
    key = jax.random.fold_in(jax.random.key(self.layer), bits.sum(dtype=jnp.uint32))
    eps = self.cfg.router_jitter
    return jax.random.uniform(key, x_BxTxD.shape, jnp.float32, 1.0 - eps, 1.0 + eps)

  def _record(self, logits_BxTxE, probs_BxTxE, experts_BxTxK, kept_BxTxK, mask_BxT):
    m = self.cfg
    w_BxT = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(w_BxT.sum(), 1.0)
    assigned_BxTxKxE = jax.nn.one_hot(experts_BxTxK, m.num_experts) * w_BxT[:, :, None, None]
    # f_i: share of the (token, choice) assignments sent to expert i, before any drop;
    # P_i: mean router probability of expert i. Both 1/E when balanced, so the loss is 1.
    f_E = assigned_BxTxKxE.sum((0, 1, 2)) / (n * m.top_k)
    p_E = (probs_BxTxE * w_BxT[..., None]).sum((0, 1)) / n
    load_balance = m.num_experts * jnp.sum(f_E * p_E)
    z = jax.nn.logsumexp(logits_BxTxE, axis=-1)
    router_z = jnp.sum(z * z * w_BxT) / n
    dropped = 1.0 - jnp.sum(kept_BxTxK * w_BxT[..., None]) / (n * m.top_k)
    stats = {"aux_loss": m.load_balance_coef * load_balance + m.z_loss_coef * router_z,
             "load_balance": load_balance, "router_z": router_z, "dropped": dropped,
             "load_E": f_E * m.num_experts}
    if hasattr(self, "stats"):  # called again before `aux_loss` popped the last call
      self.stats.set_value(self.stats.get_value() + (stats,))
    else:
      self.stats = MoEStats((stats,))


def aux_loss(model: nnx.Module, prefix: str = "moe/") -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted aux loss summed over MoE calls, metrics), popping what the forward recorded.

  Call it inside the loss function after the forward(s), on the module holding the networks
  (e.g. a policy, or an actor-critic to cover both). A dense model gives (0.0, {}).
  Metrics: `aux_loss` (what the loss adds), the per-layer means of `load_balance_loss`
  (1 = balanced) and `router_z_loss`, `dropped_fraction` of (token, choice) assignments, and
  `expert_load_min/max` (share of assignments times E: 1 = uniform) over layers and experts.
  """
  popped = nnx.pop(model, MoEStats)
  records = [r for var in jax.tree.leaves(popped, is_leaf=lambda v: isinstance(v, nnx.Variable))
             for r in var.get_value()]
  if not records:
    return jnp.zeros((), jnp.float32), {}
  stacked = {k: jnp.stack([r[k] for r in records]) for k in
             ("aux_loss", "load_balance", "router_z", "dropped")}
  total = stacked["aux_loss"].sum()
  return total, {
      f"{prefix}aux_loss": total,
      f"{prefix}load_balance_loss": stacked["load_balance"].mean(),
      f"{prefix}router_z_loss": stacked["router_z"].mean(),
      f"{prefix}dropped_fraction": stacked["dropped"].mean(),
      f"{prefix}expert_load_min": jnp.min(jnp.stack([r["load_E"].min() for r in records])),
      f"{prefix}expert_load_max": jnp.max(jnp.stack([r["load_E"].max() for r in records])),
  }
