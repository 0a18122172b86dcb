"""Model hyper-parameters: one frozen dataclass, built from an ml_collections config.

Every network (policy, value, reward) is the same trunk, so one config describes them all.
The optional sparse Mixture-of-Experts FFN is a nested `MoEConfig` (`moe`), off by default.
`from_config` rejects unknown keys and inconsistent sizes with the key name in the message,
so a typo in `--config.model.num_kv_head=2` fails at start-up, not as a shape error in jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from rlhf_jax.keys import check_known_keys
from rlhf_jax.models.lora import LoRAConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Sparse Mixture-of-Experts FFN (see `moe.py`); `num_experts=0` keeps every FFN dense."""

  num_experts: int = 0
  top_k: int = 2  # 1: Switch; 2: GShard / ST-MoE (the two gates renormalised to sum to 1).
  moe_every: int = 2  # Layers i with (i + 1) % moe_every == 0 are MoE: 2 = every other layer.
  expert_mlp_dim: int = 0  # Hidden size of each expert; 0: the dense `mlp_dim`.
  # Expert capacity max(min_capacity, round(factor * tokens_per_group * top_k / num_experts))
  # with one sequence per group; the factor is the train one unless the model is in eval
  # mode (`model.eval()`). Ignored by the dropless path.
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  # Sort tokens by expert and run `lax.ragged_dot`: no capacity, nothing dropped, and a
  # token's output does not depend on which tokens it is routed with. Needed by RL, where
  # one-token decode steps and full forwards must give the same log-probs.
  dropless: bool = False
  router_jitter: float = 0.0  # Multiplicative noise on the router input in train mode (> 0).
  load_balance_coef: float = 1e-2  # num_experts * sum_i f_i * P_i
  z_loss_coef: float = 1e-3  # mean(logsumexp(router_logits)^2)

  def __post_init__(self):
    def need(ok: bool, msg: str):
      if not ok:
        raise ValueError(f"model.moe config: {msg}")

    need(self.num_experts >= 0, f"`num_experts` must be >= 0 (0: dense), got {self.num_experts}.")
    if self.num_experts:
      need(self.top_k in (1, 2), f"`top_k` must be 1 or 2, got {self.top_k}.")
      need(self.top_k <= self.num_experts,
           f"`top_k` ({self.top_k}) exceeds `num_experts` ({self.num_experts}).")
    need(self.moe_every >= 1, f"`moe_every` must be >= 1, got {self.moe_every}.")
    need(self.expert_mlp_dim >= 0, f"`expert_mlp_dim` must be >= 0, got {self.expert_mlp_dim}.")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      need(getattr(self, name) > 0, f"`{name}` must be positive, got {getattr(self, name)}.")
    need(self.min_capacity >= 1, f"`min_capacity` must be >= 1, got {self.min_capacity}.")
    need(0.0 <= self.router_jitter < 1.0,
         f"`router_jitter` must be in [0, 1), got {self.router_jitter}.")
    for name in ("load_balance_coef", "z_loss_coef"):
      need(getattr(self, name) >= 0, f"`{name}` must be >= 0, got {getattr(self, name)}.")

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and (layer + 1) % self.moe_every == 0


# model.remat: what a block keeps for its backward pass (see transformer.REMAT_POLICIES).
REMAT_CHOICES = ("none", "full", "dots_saveable", "minimal")
# model.attention_impl: the kernel of attention without a KV cache (layers.attention_kernel).
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
ROPE_SCALING_KINDS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Stretched rotary frequencies of long-context checkpoints (Hugging Face `rope_type`).

  "linear": every inverse frequency divided by `factor` (position interpolation).
  "llama3": wavelengths above original_max_position_embeddings / low_freq_factor divided by
  `factor`, those below original_max_position_embeddings / high_freq_factor kept, and a
  smooth blend in between (LLaMA 3.1+).
  """

  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f"model.rope_scaling config: `kind` is {self.kind!r}; choose one of "
                       f"{ROPE_SCALING_KINDS}.")
    if self.kind != "none" and self.factor <= 0:
      raise ValueError(f"model.rope_scaling config: `factor` must be positive, got {self.factor}.")
    if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError("model.rope_scaling config: need 0 < low_freq_factor < high_freq_factor, "
                       f"got {self.low_freq_factor}, {self.high_freq_factor}.")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A LLaMA-style decoder. Defaults are a tiny model that trains in seconds on CPU."""

  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4  # < num_heads: grouped-query attention; 1: multi-query.
  head_dim: int = 0  # 0: d_model // num_heads.
  mlp_dim: int = 172  # SwiGLU hidden size.
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)  # none by default
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Biases on the q/k/v projections (Qwen2); no parameters when off.
  init_std: float = 0.02  # Normal init of every matrix (HF `initializer_range`).
  param_dtype: str = "float32"  # Storage dtype of parameters (and optimizer state).
  dtype: str = "float32"  # Compute dtype of matmuls; norms, softmax and RoPE stay float32.
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)  # dense by default
  # The SFT loss runs the LM head + cross-entropy over chunks of this many positions, with
  # no [B, T, V] logits in memory (lm_loss.py); 0: all positions at once.
  ce_chunk_len: int = 128
  # One `lax.scan` over the blocks, their parameters stacked on a leading `layers` axis
  # (groups of `moe.moe_every` layers with MoE): compile time no longer grows with depth.
  scan_layers: bool = False
  # Rematerialisation of each block in training forwards (transformer.REMAT_POLICIES):
  # "none", "full", "dots_saveable" or "minimal"; with scan_layers (unrolled, XLA may keep
  # the activations anyway).
  remat: str = "none"
  # Attention without a KV cache (training and scoring forwards): "xla" (XLA's ops, [B, N,
  # T, T] logits in memory), "cudnn" (cuDNN flash attention: NVIDIA GPU, bfloat16/float16
  # `dtype`) or "auto" (cudnn where it can run, xla elsewhere). Same maths: layers.py.
  attention_impl: str = "xla"
  # Low-rank adapters on the projections (lora.py); set per stage from the top-level `lora`
  # section (`lora.for_stage`), rank 0 (none) otherwise.
  lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

  def __post_init__(self):
    def need(ok: bool, msg: str):
      if not ok:
        raise ValueError(f"model config: {msg}")

    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
      need(getattr(self, name) > 0, f"`{name}` must be positive, got {getattr(self, name)}.")
    need(self.num_heads % self.num_kv_heads == 0,
         f"`num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` "
         f"({self.num_kv_heads}) for grouped-query attention.")
    if self.head_dim == 0:
      need(self.d_model % self.num_heads == 0,
           f"`d_model` ({self.d_model}) must divide by `num_heads` ({self.num_heads}), "
           "or set `head_dim` explicitly.")
    need(self.resolved_head_dim % 2 == 0,
         f"head dim {self.resolved_head_dim} must be even for rotary embeddings.")
    need(self.ce_chunk_len >= 0, f"`ce_chunk_len` must be >= 0 (0: no chunks), got "
         f"{self.ce_chunk_len}.")
    need(self.remat in REMAT_CHOICES,
         f"`model.remat` is {self.remat!r}; choose one of {REMAT_CHOICES}.")
    need(self.attention_impl in ATTENTION_IMPLS,
         f"`model.attention_impl` is {self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
    need(self.attention_impl != "cudnn" or self.dtype in ("bfloat16", "float16"),
         f"`model.attention_impl='cudnn'` needs `model.dtype` bfloat16 or float16 (got "
         f"{self.dtype!r}); set --config.model.dtype=bfloat16 or attention_impl=auto.")
    for name in ("param_dtype", "dtype"):
      need(getattr(self, name) in _DTYPES,
           f"`{name}` is {getattr(self, name)!r}; choose one of {sorted(_DTYPES)}.")
    need(isinstance(self.moe, MoEConfig),
         f"`moe` must be a MoEConfig (from_config builds it from a dict), got {self.moe!r}.")
    need(isinstance(self.rope_scaling, RopeScaling),
         f"`rope_scaling` must be a RopeScaling (from_config builds it from a dict), got "
         f"{self.rope_scaling!r}.")
    need(not (self.scan_layers and self.moe.num_experts and
              self.num_layers % self.moe.moe_every),
         f"`scan_layers` scans groups of `moe.moe_every` ({self.moe.moe_every}) layers, which "
         f"must divide `num_layers` ({self.num_layers}); change one or set scan_layers=False.")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "TransformerConfig":
    """From a ConfigDict / dict; unknown keys are an error naming the key."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    check_known_keys("model", cfg, (f.name for f in dataclasses.fields(cls)))
    if "lora" in cfg:
      cfg["lora"] = LoRAConfig.from_config(cfg["lora"])
    for name, sub_cls in (("moe", MoEConfig), ("rope_scaling", RopeScaling)):
      sub = cfg.get(name)
      if sub is not None and not isinstance(sub, sub_cls):
        sub = dict(sub.to_dict() if hasattr(sub, "to_dict") else sub)
        check_known_keys(f"model.{name}", sub, (f.name for f in dataclasses.fields(sub_cls)))
        cfg[name] = sub_cls(**sub)
    return cls(**cfg)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
