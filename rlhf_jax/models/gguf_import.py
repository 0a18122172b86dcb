"""Import a LLaMA-architecture GGUF file (llama.cpp's format), quantized or not.

Tensors are read with the PyPI `gguf` package and dequantized to float32 by
`gguf.quants.dequantize` (F32/F16/BF16, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, ...). GGUF lists a
matrix's dims innermost first, so the numpy array it gives is already Hugging Face's
[out, in] layout: we rename the tensors to Hugging Face names and reuse `hf_import`'s
mapping onto our params.

One real difference: llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) where Hugging Face
rotates halves (x[i], x[i + H/2]), so its converter permutes the rows of every q/k head to
match. We undo that permutation; without it the model still runs but its attention is
scrambled (SmolLM2's loss on Shakespeare goes from 4.6 to 5.9).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rlhf_jax.models.config import RopeScaling, TransformerConfig

# GGUF tensor name (per block: "blk.{i}." prefix) -> Hugging Face LLaMA name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  return gguf


def open_reader(path: str):
  """`gguf.GGUFReader` of `path`; a file that is not GGUF (wrong magic, truncated, empty,
  garbage) is one ValueError naming it."""
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; give a .gguf file (or a Hugging Face checkpoint "
                     "directory as the source).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  gguf = _gguf()
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  # gguf raises ValueError, IndexError, ...
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    reason += f"; the file has {os.path.getsize(path)} bytes"
    raise ValueError(f"{path}: not a readable GGUF file ({reason}); give a llama.cpp .gguf "
                     "file, downloaded again if it may be truncated.") from e


def unpermute_rows(w_RxD: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation: rows of each head from interleaved-pair order
  (2i, 2i+1) back to Hugging Face's half order (i, i + H/2)."""
  return (w_RxD.reshape(num_heads, -1, 2, w_RxD.shape[-1]).swapaxes(1, 2).reshape(w_RxD.shape))


def metadata(reader) -> dict[str, Any]:
  """The file's key/value metadata as plain Python values (token lists included)."""
  return {name: field.contents() for name, field in reader.fields.items()}


def _f32(x) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(x)))


def config_from_gguf(meta: dict[str, Any], path: str, dtype: str = "float32",
                     param_dtype: str = "float32", has_output: bool = True) -> TransformerConfig:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"{path}: GGUF architecture {arch!r} is not supported; this "
                              "importer reads 'llama' files (LLaMA, SmolLM, Mistral-style dense).")

  def get(key, default=None):
    value = meta.get(f"llama.{key}", default)
    if value is None:
      raise ValueError(f"{path}: GGUF metadata `llama.{key}` is missing.")
    return value

  if get("expert_count", 0):
    raise NotImplementedError(f"{path}: GGUF MoE models (llama.expert_count > 0) are not supported.")
  scaling = RopeScaling()
  kind = get("rope.scaling.type", "none")
  if kind == "linear":
    scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
  elif kind != "none":
    raise NotImplementedError(f"{path}: GGUF rope scaling {kind!r} is not supported (only "
                              "'linear'); import the model's Hugging Face directory instead.")
  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", d // heads))
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise NotImplementedError(f"{path}: partial rotary embeddings (rope.dimension_count "
                              f"{get('rope.dimension_count')} < head dim {head_dim}) are not supported.")
  vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
  if not vocab:
    raise ValueError(f"{path}: GGUF metadata has neither `llama.vocab_size` nor a token list.")
  return TransformerConfig(
      vocab_size=int(vocab),
      d_model=d,
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")),
      rope_theta=_f32(get("rope.freq_base", 10_000.0)),
      rope_scaling=scaling,
      rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      tie_embeddings=not has_output,  # no `output.weight`: the LM head is the embedding
      dtype=dtype,
      param_dtype=param_dtype,
  )


def read_gguf(path: str, dtype: str = "float32", param_dtype: str = "float32", *,
              unpermute: bool = True) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
  """(TransformerConfig, {hugging_face_name: float32 array}) of a LLaMA GGUF file.

  `unpermute=False` keeps llama.cpp's q/k row order (wrong for our rotary layout; only for
  measuring what the permutation matters).
  """
  reader = open_reader(path)
  gguf = _gguf()
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:  # LLaMA 3.1's rope scaling, as per-frequency factors
    raise NotImplementedError(f"{path}: GGUF `rope_freqs` (LLaMA 3.1 rope scaling) is not "
                              "supported; import the model's Hugging Face directory instead.")
  cfg = config_from_gguf(metadata(reader), path, dtype, param_dtype,
                         has_output="output.weight" in tensors)
  weights = {}
  for name, t in tensors.items():
    if name in _GLOBAL_NAMES:
      hf_name = _GLOBAL_NAMES[name]
    else:
      parts = name.split(".", 2)
      if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _BLOCK_NAMES:
        raise ValueError(f"{path}: unexpected GGUF tensor {name!r} (not a plain LLaMA model?).")
      hf_name = f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if unpermute and name.endswith("attn_q.weight"):
      w = unpermute_rows(w, cfg.num_heads)
    elif unpermute and name.endswith("attn_k.weight"):
      w = unpermute_rows(w, cfg.num_kv_heads)
    weights[hf_name] = w
  return cfg, weights
