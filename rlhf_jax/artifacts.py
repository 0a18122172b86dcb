"""What stages hand each other, and how it is saved and loaded: a trained policy, a
normalised reward model, stage folders.

A finished stage folder `<workdir>/<stage>` holds `checkpoints/` (orbax), `model_config.json`,
`tokenizer.json` and `summary.json` (its final metrics; written last, so its presence marks a
finished run); the RM's also holds `normalization.json`. The pipeline reuses a finished
folder instead of running the stage again, and a later run can point at one
(`--config.sft_checkpoint=W/sft`, `--config.rm_checkpoint=W/rm`).

A stage trained with LoRA checkpoints only its adapters and heads; its folder's `lora.json`
holds the adapters' config and the pointer to the frozen base (a seed, a pretrained source,
or the SFT folder whose trunk it started from). Loading such a folder rebuilds the base,
restores the adapters and merges them in: what a later stage gets is always a dense network
(`model_config.json` describes it), so LoRA is a way of training, not a kind of model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.fileio import write_json
from rlhf_jax.models import PolicyModel, RewardModel, TransformerConfig, lora
from rlhf_jax.train import checkpoint

SUMMARY = "summary.json"
LORA = "lora.json"


def stage_dir(workdir: str | None, stage: str) -> str | None:
  return os.path.join(workdir, stage) if workdir else None


@dataclasses.dataclass
class Policy:
  """A trained policy, as later stages need it."""
  graphdef: Any
  params: Any
  model_config: TransformerConfig
  tokenizer: tokenizer_lib.Tokenizer


def eval_model(graphdef, params):
  """A network for scoring or evaluation: MoE layers in eval mode (eval capacity factor, no
  router jitter; a no-op for dense networks)."""
  model = nnx.merge(graphdef, params)
  model.eval()
  return model


@dataclasses.dataclass
class RewardFunction:
  """A trained, normalised RM: `score(params, tokens, mask) = gain * raw + bias`."""
  graphdef: Any
  params: Any
  gain: float
  bias: float
  model_config: TransformerConfig
  tokenizer: tokenizer_lib.Tokenizer

  def score(self, params, tokens_BxT, mask_BxT):
    return self.gain * eval_model(self.graphdef, params)(tokens_BxT, mask_BxT) + self.bias

  @property
  def critic_source(self) -> "RewardFunction":
    """The RM whose trunk and calibrated head start PPO's `critic="reward"`: this one (an
    ensemble names its first member)."""
    return self


def raw_score_fn(graphdef):
  """A jitted `(params, tokens, mask) -> [B]`: the raw (unnormalised) score of an RM."""
  return jax.jit(lambda p, t, m: eval_model(graphdef, p)(t, m))


def sequence_scores(score_fn, params, tokens_NxT, mask_NxT, batch_size: int,
                    mesh) -> np.ndarray:
  """`score_fn(params, tokens, mask) -> [..., B]` (jitted: `raw_score_fn`, a `RewardFunction`'s
  normalised `score`, or a reward ensemble's `scores`, [K, B]) over host rows of token ids,
  e.g. `sampling.Samples.seq` / `seq_mask` (PPO's rollout layout), `batch_size` rows at a
  time on the mesh; [..., N] float32."""
  outs = sharding.for_each_batch(lambda _, b: score_fn(params, b["tokens"], b["mask"]),
                                 {"tokens": tokens_NxT, "mask": mask_NxT}, batch_size, mesh)
  if not outs:
    return np.zeros((0,), np.float32)
  return np.concatenate(outs, axis=-1)[..., :len(tokens_NxT)]


def save_network(out_dir: str, model_cfg: TransformerConfig, tok, summary: dict, **extra_json):
  """The files that make `out_dir` a finished stage folder (its checkpoints already written).
  `summary.json` goes last: a folder without it is an unfinished run."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "model_config.json"), model_cfg.to_dict())
  write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_lib.describe(tok))
  for name, value in extra_json.items():
    write_json(os.path.join(out_dir, f"{name}.json"), value)
  write_json(os.path.join(out_dir, SUMMARY), summary)


def finished(out_dir: str | None, num_steps: int | None = None) -> bool:
  """Whether `out_dir` holds a finished run (of `num_steps` steps, when given)."""
  if not out_dir or not os.path.exists(os.path.join(out_dir, SUMMARY)):
    return False
  if num_steps is None:
    return True
  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), save_every=0)
  done = ckpt.latest_good_step() == num_steps
  ckpt.close()
  return done


def read_summary(out_dir: str) -> dict[str, float]:
  path = os.path.join(out_dir, SUMMARY)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_network(out_dir: str, model_cls, mesh, extra_files=(), hint: str = ""):
  """(graphdef, params, model config, tokenizer) of a finished stage folder, params placed
  on `mesh`; a LoRA folder's adapters merged into its base."""
  for name in ("model_config.json", "tokenizer.json", *extra_files):
    if not os.path.exists(os.path.join(out_dir, name)):
      raise FileNotFoundError(f"{out_dir}: no {name}; {hint}")
  with open(os.path.join(out_dir, "model_config.json")) as f:
    model_cfg = TransformerConfig.from_config(json.load(f))
  with open(os.path.join(out_dir, "tokenizer.json")) as f:
    tok = tokenizer_lib.from_description(json.load(f))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(model_cfg, nnx.Rngs(0))))
  adapters = read_lora(out_dir)
  if adapters is not None:  # restore the adapters onto the rebuilt base, then merge
    lora_cfg, base = adapters
    lcfg = dataclasses.replace(model_cfg, lora=lora_cfg)
    _, like = lora.attach(lambda: model_cls(lcfg, nnx.Rngs(0)),
                          lora_base(base, model_cls, model_cfg, mesh), 0, mesh)
    trains = lora.trainable_of(lcfg) if model_cls is PolicyModel else lora.is_trainable
    trained, frozen = nnx.split_state(like, trains, ...)
    params = nnx.merge_state(_restore_final(out_dir, trained), frozen)
    return graphdef, merged(params, lora_cfg), model_cfg, tok
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, sharding.param_shardings(abstract, mesh))
  return graphdef, _restore_final(out_dir, abstract), model_cfg, tok


def _restore_final(out_dir: str, like):
  """The final checkpoint's params (shaped and placed like `like`); an error when only an
  earlier one restores."""
  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), save_every=0)
  params = ckpt.restore_params(like)
  restored, latest = ckpt.restored_step, ckpt.latest_step()
  ckpt.close()
  if restored != latest:  # the final parameters are damaged: do not hand on earlier ones
    raise ValueError(f"{out_dir}/checkpoints: the final checkpoint (step {latest}) is damaged "
                     f"(step {restored} restored instead); rerun that stage to rewrite it.")
  return params


def write_lora(out_dir: str, lora_cfg: lora.LoRAConfig, base: dict) -> None:
  """`lora.json`: the adapters' config and the pointer to the base (`lora_base`)."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, LORA), {"lora": lora_cfg.to_dict(), "base": base})


def sft_folder(config, workdir: str | None) -> str:
  """The absolute path of the SFT folder a run's later stages start from: `sft_checkpoint`,
  else `<workdir>/sft`."""
  return os.path.abspath(config.get("sft_checkpoint") or stage_dir(workdir, "sft"))


def start_lora_stage(config, stage: str, policy: Policy, workdir: str | None, mesh) -> Policy:
  """The policy an RL stage trains (`lora_view` of the SFT `policy` under `lora.for_stage`);
  with LoRA, `<workdir>/<stage>/lora.json` points export at the SFT folder for the base."""
  adapters = lora.for_stage(config, stage)
  out_dir = stage_dir(workdir, stage)
  if adapters.enabled and out_dir and jax.process_index() == 0:
    write_lora(out_dir, adapters, {"policy": sft_folder(config, workdir)})
  return lora_view(policy, adapters, config.seed, mesh)


def read_lora(out_dir: str) -> tuple[lora.LoRAConfig, dict] | None:
  path = os.path.join(out_dir, LORA)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    d = json.load(f)
  return lora.LoRAConfig.from_config(d["lora"]), d["base"]


def lora_base(base: dict, model_cls, model_cfg: TransformerConfig, mesh):
  """The frozen base a LoRA stage trained on, rebuilt from its pointer: `init_from` (a
  pretrained source, as SFT imported it) or a fresh network of `seed`, with `trunk_from`'s
  (an SFT folder's) trunk when given (an RM started from the SFT policy)."""
  if base.get("init_from"):
    from rlhf_jax.models import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained.init_policy(base["init_from"], base["model"], model_cfg.vocab_size, mesh,
                                  cache_dir=base.get("cache_dir"))[1]
  _, params = sharding.init_sharded(lambda: model_cls(model_cfg, nnx.Rngs(params=base["seed"])),
                                    mesh)
  if base.get("trunk_from"):
    params["trunk"] = load_policy(base["trunk_from"], mesh).params["trunk"]
  return params


def lora_view(policy: Policy, adapters: lora.LoRAConfig, seed: int, mesh) -> Policy:
  """`policy` as the LoRA network of `adapters`, on the same base arrays (no copy) with fresh
  adapters (B = 0: it computes exactly what `policy` does); `policy` when `adapters` is off.
  An RL stage trains this network, and the view itself is its reference (the base with the
  adapters switched off), so policy, reference and samplers share one graph and one base."""
  if not adapters.enabled:
    return policy
  cfg = dataclasses.replace(policy.model_config, lora=adapters)
  graphdef, params = lora.attach(lambda: PolicyModel(cfg, nnx.Rngs(0)), policy.params, seed,
                                 mesh)
  return Policy(graphdef, params, cfg, policy.tokenizer)


def merged(params, lora_cfg: lora.LoRAConfig):
  """The dense network's params of a LoRA network's (`lora.merge`), shardings kept."""
  return _merge_fn(lora_cfg.scale)(params)


@functools.lru_cache(maxsize=None)
def _merge_fn(scale: float):
  return jax.jit(lambda p: lora.merge(p, scale))


def load_policy(sft_dir: str, mesh) -> Policy:
  """The final policy of a finished SFT folder (a workdir's `sft`)."""
  return Policy(*load_network(sft_dir, PolicyModel, mesh, hint="expected the 'sft' folder of "
                              "a finished run (e.g. --config.sft_checkpoint=workdir/sft)."))


def load_reward_model(rm_dir: str, mesh) -> RewardFunction:
  """The final RM of a finished RM folder (a workdir's `rm`) with its normalisation."""
  graphdef, params, model_cfg, tok = load_network(
      rm_dir, RewardModel, mesh, extra_files=("normalization.json",),
      hint="expected the 'rm' folder of a finished RM run (e.g. --config.rm_checkpoint=workdir/rm).")
  with open(os.path.join(rm_dir, "normalization.json")) as f:
    norm = json.load(f)
  return RewardFunction(graphdef, params, norm["gain"], norm["bias"], model_cfg, tok)


def read_model_config(out_dir: str) -> TransformerConfig:
  with open(os.path.join(out_dir, "model_config.json")) as f:
    return TransformerConfig.from_config(json.load(f))


def on_mesh(params, mesh):
  """`params` placed by the sharding rules on `mesh` (e.g. handed over from another stage)."""
  return jax.device_put(params, sharding.param_shardings(params, mesh))
