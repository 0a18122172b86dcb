"""Model hyper-parameters: one frozen dataclass, built from an ml_collections config.

Every network (policy, value, reward) is the same trunk, so one config describes them all.
`from_config` rejects unknown keys and inconsistent sizes with the key name in the message,
so a typo in `--config.model.num_kv_head=2` fails at start-up, not as a shape error in jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from rlhf_jax.keys import check_known_keys

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  init_std: float = 0.02  # Normal init of every matrix (HF `initializer_range`).
  param_dtype: str = "float32"  # Storage dtype of parameters (and optimizer state).
  dtype: str = "float32"  # Compute dtype of matmuls; norms, softmax and RoPE stay float32.

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
    for name in ("param_dtype", "dtype"):
      need(getattr(self, name) in _DTYPES,
           f"`{name}` is {getattr(self, name)!r}; choose one of {sorted(_DTYPES)}.")

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
    return cls(**cfg)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
