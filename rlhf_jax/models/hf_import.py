"""Import a Hugging Face LLaMA-family checkpoint directory (config.json + *.safetensors).

Reads LLaMA 1/2/3 (`model_type: llama`, incl. `linear` and `llama3` rope scaling) and Qwen2
(`model_type: qwen2`: LLaMA plus q/k/v biases); anything else is an error naming the field.
Hugging Face stores each projection as a [out, in] matrix; ours are einsum kernels with the
head dims split out ([D, N, H] for q, [N, H, D] for o), so a converted weight is a transpose
plus a reshape. Rotary embeddings use the same rotate-half layout on both sides, so no
permutation of q/k rows is needed (GGUF files differ: see gguf_import.py).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import RopeScaling, TransformerConfig
from rlhf_jax.models import transformer
from rlhf_jax.models.heads import PolicyModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def _rope(hf: dict[str, Any], path: str) -> tuple[float, RopeScaling]:
  """(theta, scaling). transformers >= 5 nests RoPE settings in `rope_parameters`; older
  files use a top-level `rope_theta` and an optional `rope_scaling` dict."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type")) or "default"
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  if rope_type == "default":
    return theta, RopeScaling()

  def field(name):
    if name not in rope:
      raise ValueError(f"{path}: rope type {rope_type!r} needs `{name}` in its rope settings.")
    return rope[name]

  if rope_type == "linear":
    return theta, RopeScaling(kind="linear", factor=float(field("factor")))
  if rope_type == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(field("factor")),
        low_freq_factor=float(field("low_freq_factor")),
        high_freq_factor=float(field("high_freq_factor")),
        original_max_position_embeddings=int(field("original_max_position_embeddings")))
  raise NotImplementedError(f"{path}: rope type {rope_type!r} is not supported; this importer "
                            "reads 'default', 'linear' and 'llama3' rotary embeddings.")


def config_from_hf(hf: dict[str, Any], path: str = "config.json", dtype: str = "float32",
                   param_dtype: str = "float32") -> TransformerConfig:
  """Our TransformerConfig from a Hugging Face LLaMA config dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise NotImplementedError(f"{path}: model_type {model_type!r} is not supported; this importer "
                              f"reads {SUPPORTED_MODEL_TYPES} checkpoints.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):  # LLaMA's attention_bias also puts a bias on o_proj, which we lack.
      raise NotImplementedError(f"{path}: `{flag}: true` is not supported (only Qwen2's q/k/v "
                                "biases are).")
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"{path}: hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU).")
  sliding = hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ())
  if sliding:
    raise NotImplementedError(f"{path}: sliding-window attention (`use_sliding_window` / "
                              "`layer_types`) is not supported; every layer must attend fully.")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope(hf, path)
  return TransformerConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"],
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      init_std=hf.get("initializer_range", 0.02),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{directory}: no *.safetensors files (a PyTorch .bin checkpoint must "
                            "be re-saved with `save_pretrained(..., safe_serialization=True)`).")
  tensors = {}
  for f in files:
    # framework="flax" reads bfloat16 too (numpy has no bfloat16 of its own).
    with safe_open(f, framework="flax") as st:
      for k in st.keys():
        tensors[k] = np.asarray(st.get_tensor(k).astype(jnp.float32))
  return tensors


def hf_weights_to_params(cfg: TransformerConfig, w: dict[str, np.ndarray], path: str = ""):
  """nnx.State of a `PolicyModel` from a {hf_name: array} dict (stacked layers with
  `cfg.scan_layers`)."""
  _, state = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg, nnx.Rngs(0))))
  pure = hf_weights_to_pure(cfg, w, path)
  pure["trunk"] = transformer.trunk_for(cfg, pure["trunk"])
  pure = _to_dtype(pure, cfg.jnp_param_dtype)
  nnx.replace_by_pure_dict(state, pure)
  return state


def hf_weights_to_pure(cfg: TransformerConfig, w: dict[str, np.ndarray], path: str = ""):
  """The pure-dict params (numpy, as stored) of a `PolicyModel` from {hf_name: array}, one
  `blocks` entry per layer whatever `cfg.scan_layers` (`transformer.trunk_for` stacks them)."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

  def take(name, shape):
    if name not in w:
      raise KeyError(f"{path}: tensor {name!r} is missing from the checkpoint.")
    if tuple(w[name].shape) != shape:
      raise ValueError(f"{path}: tensor {name!r} has shape {w[name].shape}, expected {shape}.")
    return w.pop(name)

  def layer(i):
    p = f"model.layers.{i}."
    attn = {
        "q_DxNxH": take(p + "self_attn.q_proj.weight", (n * h, d)).T.reshape(d, n, h),
        "k_DxKxH": take(p + "self_attn.k_proj.weight", (k * h, d)).T.reshape(d, k, h),
        "v_DxKxH": take(p + "self_attn.v_proj.weight", (k * h, d)).T.reshape(d, k, h),
        "o_NxHxD": take(p + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d),
    }
    if cfg.qkv_bias:
      attn.update(q_bias_NxH=take(p + "self_attn.q_proj.bias", (n * h,)).reshape(n, h),
                  k_bias_KxH=take(p + "self_attn.k_proj.bias", (k * h,)).reshape(k, h),
                  v_bias_KxH=take(p + "self_attn.v_proj.bias", (k * h,)).reshape(k, h))
    return {
        "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
        "attn": attn,
        "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
        "mlp": {
            "gate_DxF": take(p + "mlp.gate_proj.weight", (cfg.mlp_dim, d)).T,
            "up_DxF": take(p + "mlp.up_proj.weight", (cfg.mlp_dim, d)).T,
            "down_FxD": take(p + "mlp.down_proj.weight", (d, cfg.mlp_dim)).T,
        },
    }

  w = dict(w)
  pure = {"trunk": {
      "embed_VxD": take("model.embed_tokens.weight", (cfg.vocab_size, d)),
      "blocks": {i: layer(i) for i in range(cfg.num_layers)},
      "final_norm": {"scale": take("model.norm.weight", (d,))},
  }}
  if cfg.tie_embeddings:
    w.pop("lm_head.weight", None)  # Some tied checkpoints still store a copy.
  else:
    pure["lm_head_DxV"] = take("lm_head.weight", (cfg.vocab_size, d)).T
  leftover = sorted(k for k in w if "rotary_emb" not in k)
  if leftover:
    raise ValueError(f"{path}: unexpected tensors {leftover[:5]}{'...' if len(leftover) > 5 else ''}"
                     " (not a plain LLaMA checkpoint?).")
  return pure


def _to_dtype(tree, dtype):
  if isinstance(tree, dict):
    return {k: _to_dtype(v, dtype) for k, v in tree.items()}
  return jnp.asarray(np.ascontiguousarray(tree), dtype)


def load_hf_llama(directory: str, dtype: str = "float32", param_dtype: str = "float32"):
  """(TransformerConfig, params) of a PolicyModel from a Hugging Face LLaMA directory."""
  cfg, w = read_hf_checkpoint(directory, dtype, param_dtype)
  return cfg, hf_weights_to_params(cfg, w, directory)


def read_hf_checkpoint(directory: str, dtype: str = "float32", param_dtype: str = "float32"):
  """(TransformerConfig, {hf_name: float32 array}) of a Hugging Face checkpoint directory."""
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face checkpoint "
                            "directory (config.json + *.safetensors).")
  with open(cfg_path) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, cfg_path, dtype=dtype, param_dtype=param_dtype)
  return cfg, _read_safetensors(directory)
