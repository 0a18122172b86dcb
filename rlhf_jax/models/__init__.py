"""LLaMA-style networks: trunk (transformer.py), sparse MoE FFN (moe.py), heads (heads.py),
imports (hf_import.py, gguf_import.py; pretrained.py picks and caches a source), the chunked
LM-head cross-entropy of the SFT loss (lm_loss.py)."""

from rlhf_jax.models.config import MoEConfig, TransformerConfig
from rlhf_jax.models.heads import ActorCritic, PolicyModel, RewardModel, ScalarHead, ValueModel, build
from rlhf_jax.models.transformer import KVCache, Transformer, init_cache, last_token_index, positions_from_mask

__all__ = ["ActorCritic", "KVCache", "MoEConfig", "PolicyModel", "RewardModel", "ScalarHead", "Transformer",
           "TransformerConfig", "ValueModel", "build", "init_cache", "last_token_index",
           "positions_from_mask"]
