"""Export our LLaMA-family params as a Hugging Face checkpoint directory: the inverse of
hf_import.py.

Our projections are einsum kernels with the head dims split out ([D, N, H] for q, [N, H, D]
for o); Hugging Face stores each as an [out, in] matrix, so an exported weight is a reshape
plus a transpose, exact in float32 (re-importing gives the same bits). Both sides rotate
halves for RoPE, so no q/k row permutation is applied (GGUF files differ: see gguf_import.py).
A model with q/k/v biases (`model.qkv_bias`, only ever set by a Qwen2 import) is written as
Qwen2, anything else as LLaMA. A policy becomes `*ForCausalLM` (tied embeddings: no
`lm_head.weight`, as transformers saves them); a reward model `*ForSequenceClassification`
with one label, whose `score` has no bias, so our head's bias is returned for the caller to
record. Sparse MoE models have no transformers LLaMA counterpart and are refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from rlhf_jax.fileio import no_space_error
from rlhf_jax.models import transformer
from rlhf_jax.models.config import TransformerConfig

# (model_type, what) -> the transformers class named in config.json's `architectures`.
ARCHITECTURES = {
    ("llama", "policy"): "LlamaForCausalLM",
    ("llama", "reward"): "LlamaForSequenceClassification",
    ("qwen2", "policy"): "Qwen2ForCausalLM",
    ("qwen2", "reward"): "Qwen2ForSequenceClassification",
}
INDEX_FILE = "model.safetensors.index.json"


def check_exportable(cfg: TransformerConfig, what: str) -> None:
  """Raises for what transformers' LLaMA / Qwen2 cannot express (`what` names the source)."""
  if cfg.moe.num_experts:
    raise ValueError(f"{what} is a sparse MoE (model.moe.num_experts={cfg.moe.num_experts}): "
                     "transformers' LLaMA and Qwen2 have no MoE layers, so it cannot be exported "
                     "as a Hugging Face checkpoint; export a dense run instead.")


def model_type(cfg: TransformerConfig) -> str:
  """"qwen2" for a model with q/k/v biases (what hf_import reads from Qwen2), else "llama"."""
  return "qwen2" if cfg.qkv_bias else "llama"


def _rope_fields(cfg: TransformerConfig) -> dict[str, Any]:
  """RoPE settings in both spellings: transformers >= 5 reads `rope_parameters`, older
  versions (and other LLaMA readers) the top-level `rope_theta` and `rope_scaling`."""
  s = cfg.rope_scaling
  scaling = None
  if s.kind == "linear":
    scaling = {"rope_type": "linear", "factor": s.factor}
  elif s.kind == "llama3":
    scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings}
  params = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
  return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def hf_config(cfg: TransformerConfig, what: str, *, bos_id: int | None, eos_id: int,
              pad_id: int, max_position_embeddings: int) -> dict[str, Any]:
  """config.json of a `what` ("policy" or "reward") exported from `cfg`, in float32."""
  kind = model_type(cfg)
  out = {
      "architectures": [ARCHITECTURES[kind, what]],
      "model_type": kind,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      **_rope_fields(cfg),
      # A reward model has no LM head to tie.
      "tie_word_embeddings": cfg.tie_embeddings and what == "policy",
      "attention_dropout": 0.0,
      "initializer_range": cfg.init_std,
      "use_cache": True,
      "torch_dtype": "float32",  # transformers < 5
      "dtype": "float32",
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
  }
  if kind == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  if what == "reward":
    # One regression output; transformers reads it at the last token != pad_token_id.
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               problem_type="regression")
  return out


def _leaf(tree: dict, path: str, shape: tuple[int, ...]) -> np.ndarray:
  """tree[a][b]... for path "a/b/..." as float32, with its shape checked against the config."""
  node: Any = tree
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise KeyError(f"parameter {path!r} is missing; were these params trained with this "
                     "model config?")
    node = node[key]
  x = np.asarray(node, np.float32)
  if x.shape != shape:
    raise ValueError(f"parameter {path!r} has shape {x.shape}; the model config implies {shape}.")
  return x


def trunk_to_hf(cfg: TransformerConfig, trunk: dict) -> dict[str, np.ndarray]:
  """{hf_name: float32 [out, in] array} of a trunk's pure dict (block keys int or str;
  per-layer `blocks` or a scanned trunk's `stacked_blocks`, unstacked here)."""
  d, n, k, h, f = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                   cfg.mlp_dim)
  trunk = transformer.per_layer_trunk(cfg, trunk)
  trunk = dict(trunk, blocks={str(i): b for i, b in trunk.get("blocks", {}).items()})
  w = {"model.embed_tokens.weight": _leaf(trunk, "embed_VxD", (cfg.vocab_size, d))}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."

    def at(path, shape, i=i):
      return _leaf(trunk, f"blocks/{i}/{path}", shape)

    w[p + "input_layernorm.weight"] = at("attn_norm/scale", (d,))
    w[p + "self_attn.q_proj.weight"] = at("attn/q_DxNxH", (d, n, h)).reshape(d, n * h).T
    w[p + "self_attn.k_proj.weight"] = at("attn/k_DxKxH", (d, k, h)).reshape(d, k * h).T
    w[p + "self_attn.v_proj.weight"] = at("attn/v_DxKxH", (d, k, h)).reshape(d, k * h).T
    if cfg.qkv_bias:
      w[p + "self_attn.q_proj.bias"] = at("attn/q_bias_NxH", (n, h)).reshape(n * h)
      w[p + "self_attn.k_proj.bias"] = at("attn/k_bias_KxH", (k, h)).reshape(k * h)
      w[p + "self_attn.v_proj.bias"] = at("attn/v_bias_KxH", (k, h)).reshape(k * h)
    w[p + "self_attn.o_proj.weight"] = at("attn/o_NxHxD", (n, h, d)).reshape(n * h, d).T
    w[p + "post_attention_layernorm.weight"] = at("mlp_norm/scale", (d,))
    w[p + "mlp.gate_proj.weight"] = at("mlp/gate_DxF", (d, f)).T
    w[p + "mlp.up_proj.weight"] = at("mlp/up_DxF", (d, f)).T
    w[p + "mlp.down_proj.weight"] = at("mlp/down_FxD", (f, d)).T
  w["model.norm.weight"] = _leaf(trunk, "final_norm/scale", (d,))
  return {name: np.ascontiguousarray(x) for name, x in w.items()}


def policy_to_hf(cfg: TransformerConfig, pure: dict) -> dict[str, np.ndarray]:
  """Hugging Face `*ForCausalLM` tensors of a `PolicyModel`'s pure dict."""
  w = trunk_to_hf(cfg, pure["trunk"])
  if not cfg.tie_embeddings:  # tied: transformers ties lm_head to the embedding on load
    w["lm_head.weight"] = np.ascontiguousarray(
        _leaf(pure, "lm_head_DxV", (cfg.d_model, cfg.vocab_size)).T)
  return w


def reward_to_hf(cfg: TransformerConfig, pure: dict) -> tuple[dict[str, np.ndarray], float]:
  """(`*ForSequenceClassification` tensors, our head's bias) of a `RewardModel`'s pure dict.
  transformers' `score` is a bias-free linear layer: its output plus the bias is our raw
  score."""
  w = trunk_to_hf(cfg, pure["trunk"])
  w["score.weight"] = np.ascontiguousarray(_leaf(pure, "reward_head/w_Dx1", (cfg.d_model, 1)).T)
  return w, float(_leaf(pure, "reward_head/b_1", (1,))[0])


def shard_plan(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
  """Tensor names grouped into files of at most `max_shard_bytes` each, in order (a tensor
  larger than that gets a file of its own, as transformers' `save_pretrained` does)."""
  groups: list[list[str]] = [[]]
  size = 0
  for name, x in tensors.items():
    if groups[-1] and size + x.nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += x.nbytes
  return groups


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str,
                      max_shard_bytes: int) -> list[str]:
  """Writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` and
  `model.safetensors.index.json` when the tensors exceed `max_shard_bytes`; the file names."""
  groups = shard_plan(tensors, max_shard_bytes)
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  for name, group in zip(names, groups):
    path = os.path.join(out_dir, name)
    try:  # transformers refuses safetensors files without a "format" it knows
      save_file({k: tensors[k] for k in group}, path, metadata={"format": "pt"})
    except OSError as e:
      err = no_space_error(e, path)
      if err is e:
        raise
      raise err from e
  umask = os.umask(0)
  os.umask(umask)
  for name in names:  # safetensors creates its files private (0600); the rest are not
    os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)
  if len(groups) > 1:
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
             "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    names.append(INDEX_FILE)
  return names
