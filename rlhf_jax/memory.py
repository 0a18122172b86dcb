"""Per-device memory estimate of a stage of a run: every network it holds, before anything is
allocated.

`estimate(config, stage=...)` reads the one config of the run: the network from the shared
`model`, `tokenizer` and `init_from` (every stage's networks share that shape), sequence lengths
from the shared `data`, the mesh from the one `mesh`, and batch sizes and micro-batches from the
stage's own section (`<stage>.data`, `<stage>.optim`, and its algorithm's keys). Every stage
of `rlhf_jax.config.STAGES` is modelled (`MODELLED_STAGES`), by the networks it holds:
    sft          the policy, trained
    rm           the reward model, trained; the SFT policy (preference sampling), frozen
    ppo          policy and critic, trained; reference policy and RM (`ppo.reward="model"`)
    grpo, rloo,  the policy, trained; reference policy and RM (`reward="model"`); no critic
    reinforce_pp
    dpo          the policy, trained; reference policy and RM (`dpo.reward="model"`, for the
                 summary's score)
    best_of_n    the SFT policy and RM (`reward="model"`), nothing trained

For each network the parameter bytes per device are exact: the model is built abstractly
(`nnx.eval_shape`) and each parameter's shard shape follows from its logical axes, the
rules table and the mesh, as `sharding.param_shardings` places it. Trained networks add
gradients and AdamW's two moments (in the parameter dtype, as optax keeps them), plus a
gradient accumulator with `<stage>.optim.grad_accum_steps` > 1.

Activations are an analytic model of what a step keeps per device, per token and layer,
`model.remat` included: see `activation_memory.py`. LM logits are counted at each position
whose logits are read (SFT: all but the last, `model.ce_chunk_len` of them at a time; PPO, the
group stages and DPO: the response; sampling: the last prompt token). Generation with
`model.scan_layers` also holds one unscanned copy of the sampled policy's weights
(`transformer.unscanned`). The phases, per stage:
    sft          train step (batch / micro-batches); eval sampling
    rm           train step (2 x pairs / micro-batches); preference sampling
    ppo, grpo,   rollout (B prompts x G samples; PPO G = 1); experience forward of the B G
    rloo,        responses (policy and reference logits on the response, alive together,
    reinforce_pp plus scalar-headed critic / RM); train step on B G / minibatches /
                 micro-batches rows (PPO: + the critic's)
    dpo          reference log-probs of 2 x batch (chosen + rejected) rows, once; train step
                 on 2 x batch / micro-batches rows; held-out sampling of a batch of prompts
    best_of_n    sampling (batch x max(n) rows); RM forward over them
Phases do not overlap: the peak is the resident parameters/optimizer state plus the largest
phase. MoE layers are counted as dense for activations; XLA's fusion decisions move the real
figure by tens of percent, and `compiled_step_memory` reads XLA's own number for a jitted
step when one is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax import config as config_lib, scale, sharding
from rlhf_jax.activation_memory import Activations
from rlhf_jax.models import PolicyModel, RewardModel, TransformerConfig, ValueModel, lora

GIB = 1024 ** 3


@dataclasses.dataclass
class Part:
  name: str  # e.g. "policy params"
  bytes: float


@dataclasses.dataclass
class Estimate:
  stage: str
  mesh: dict[str, int]
  resident: list[Part]  # alive for the whole stage
  phases: list[Part]  # transient, one at a time
  param_counts: dict[str, int]  # network -> parameters
  notes: list[str]

  @property
  def peak_phase(self) -> Part:
    return max(self.phases, key=lambda p: p.bytes)

  @property
  def total_bytes(self) -> float:
    return sum(p.bytes for p in self.resident) + self.peak_phase.bytes


def resolve_mesh(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes of `config.mesh` on `num_devices` devices (one axis may be -1)."""
  cfg = dict(mesh_cfg)
  n = int(cfg.pop("num_devices", 0) or 0) or num_devices
  sizes = {a: int(cfg.get(a, 1)) for a in sharding.MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for a, s in sizes.items():
    if s == -1:
      sizes[a] = max(n // fixed, 1)
  return sizes


def _shard_elems(shape, logical, mesh: Mapping[str, int], rules) -> int:
  if logical is None:
    return math.prod(shape)
  out = 1
  for dim, axes in zip(shape, sharding.logical_to_spec(logical, rules)):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    out *= -(-dim // math.prod(mesh[a] for a in names))
  return out


def network_params(model_cls, cfg: TransformerConfig, mesh: Mapping[str, int],
                   rules=sharding.LOGICAL_AXIS_RULES, keep=None) -> tuple[int, int]:
  """(bytes per device, parameter count) of `model_cls(cfg, rngs)`, never allocated; with
  `keep` (an nnx path filter, e.g. `lora.Trainable`) of those parameters only."""
  per_device, count = 0, 0
  for path, shape, dtype, logical in _abstract_params(model_cls, cfg):
    if keep is None or keep(path):
      per_device += _shard_elems(shape, logical, mesh, rules) * np.dtype(dtype).itemsize
      count += math.prod(shape)
  return per_device, count


@functools.lru_cache(maxsize=32)  # building a 7B model abstractly takes a second or two
def _abstract_params(model_cls, cfg: TransformerConfig):
  """(path, shape, dtype, logical axes) of every parameter (LoRA's dropout keys are none)."""
  _, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))
  return tuple((path, tuple(v.shape), v.dtype, v.get_metadata().get("logical_axes"))
               for path, v in nnx.to_flat_state(abstract) if isinstance(v, nnx.Param))


def _vocab_size(config) -> tuple[int, str]:
  """The vocabulary the run will have once its tokenizer exists, and where it came from."""
  t = config.tokenizer
  if t.kind == "byte":
    from rlhf_jax.data.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
    return ByteTokenizer.vocab_size, "byte tokenizer"
  init_from = config.get("init_from", "")
  cfg_json = os.path.join(init_from, "config.json") if init_from else ""
  if cfg_json and os.path.exists(cfg_json):
    with open(cfg_json) as f:
      return int(json.load(f)["vocab_size"]), cfg_json
  return int(t.vocab_size), "tokenizer.vocab_size"


def _model_config(config) -> tuple[TransformerConfig, str]:
  vocab, source = _vocab_size(config)
  return TransformerConfig.from_config(dict(config.model, vocab_size=vocab)), source


def _trained(name: str, param_bytes: float, accum: int) -> list[Part]:
  parts = [Part(f"{name} params", param_bytes), Part(f"{name} grads", param_bytes),
           Part(f"{name} AdamW moments", 2 * param_bytes)]
  if accum > 1:
    parts.append(Part(f"{name} grad accumulator", param_bytes))
  return parts


@dataclasses.dataclass
class _Stage:
  """What one stage's model reads (the network shape, the mesh, the shared lengths, the
  stage's section) and the parts it adds."""
  config: ml_collections.ConfigDict
  name: str
  mesh: dict[str, int]
  model_cfg: TransformerConfig
  act: Activations
  resident: list[Part] = dataclasses.field(default_factory=list)
  phases: list[Part] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def section(self):
    return self.config[self.name]

  @property
  def accum(self) -> int:
    return self.section.optim.grad_accum_steps

  @property
  def micro_batch(self) -> int:
    """Rows (RM, DPO: pairs) of one forward/backward of the train step."""
    return update_rows(self.config, self.name) // self.accum

  @property
  def prompt_len(self) -> int:
    return self.config.data.max_prompt_len

  @property
  def completion_len(self) -> int:
    return self.config.data.max_completion_len

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.completion_len

  def params(self, network: str, model_cls=PolicyModel) -> float:
    """Bytes per device of `network`'s parameters (counted under that name)."""
    per_device, count = network_params(model_cls, self.model_cfg, self.mesh)
    self.counts[network] = count
    return per_device

  @property
  def adapters(self) -> lora.LoRAConfig:
    return lora.for_stage(self.config, self.name)

  def trained(self, network: str, model_cls=PolicyModel, base_shared: bool = False) -> None:
    """A trained network: all of it, or with LoRA its frozen base (none when `base_shared`:
    the arrays of a network counted elsewhere) + adapters and heads with their gradients
    and AdamW moments."""
    if not self.adapters.enabled:
      self.resident += _trained(network, self.params(network, model_cls), self.accum)
      return
    if not base_shared:
      self.frozen(f"{network} base", network, model_cls)
    cfg = dataclasses.replace(self.model_cfg, lora=self.adapters)
    keep = lora.trainable_of(cfg) if model_cls is PolicyModel else lora.is_trainable
    nbytes, count = network_params(model_cls, cfg, self.mesh, keep=keep)
    self.counts[f"{network} trained (LoRA)"] = count
    self.resident += _trained(f"{network} adapters + heads", nbytes, self.accum)

  def frozen(self, label: str, network: str, model_cls=PolicyModel) -> None:
    self.resident.append(Part(f"{label} params (frozen)", self.params(network, model_cls)))

  def reward_model(self) -> bool:
    """The frozen RM, where the stage scores with it (`<stage>.reward == "model"`)."""
    if self.section.reward != "model":
      return False
    self.frozen("reward model", "reward model", RewardModel)
    return True

  def phase(self, label: str, nbytes: float) -> None:
    self.phases.append(Part(label, nbytes))

  def sampling(self, label: str, prompts: int, samples: int = 1) -> None:
    """Generation of `samples` responses to each of `prompts` prompts."""
    what = f"{prompts} prompts" + (f" x {samples}" if samples > 1 else "")
    nbytes = self.act.generate(prompts, self.prompt_len, self.completion_len, samples)
    holds = "KV cache + prefill"
    if self.model_cfg.scan_layers:  # the sampler decodes from an unscanned copy
      holds += " + unscanned weights"
      nbytes += network_params(PolicyModel, self.model_cfg, self.mesh)[0]
    self.phase(f"{label} ({what}: {holds})", nbytes)

  def train_step(self, rows: int, logit_positions: int | None = None,
                 critic: bool = False) -> None:
    """A train step of the trained network (+ a full critic) on `rows` sequences per
    micro-batch."""
    t = self.seq_len
    nbytes = self.act.train(rows, t, logit_positions)
    if critic:
      nbytes += self.act.train(rows, t, 0)
    self.phase(f"train step activations ({rows} rows x {t})", nbytes)


def _sft_stage(s: _Stage) -> None:
  t = s.seq_len
  s.trained("policy")
  s.train_step(s.micro_batch, min(t - 1, s.model_cfg.ce_chunk_len or t))
  s.sampling("eval sampling", s.section.data.batch_size)


def _rm_stage(s: _Stage) -> None:
  s.frozen("SFT policy", "policy")
  # With LoRA and rm.init="sft" the RM's frozen trunk is the SFT policy's (not copied).
  s.trained("reward model", RewardModel, base_shared=s.section.init == "sft")
  s.train_step(2 * s.micro_batch, 0)  # chosen and rejected in one forward
  s.sampling("preference sampling", s.section.data.generation_batch_size)


def _online_rl(s: _Stage, prompts: int, samples: int, scalar_networks: int,
               critic_train: bool) -> None:
  """PPO's and the group stages' iteration: a rollout of `samples` responses per prompt; the
  experience forward (policy and reference logits on the response, alive together, plus
  `scalar_networks` scalar-headed ones: critic, RM); the train step on a micro-batch of a
  minibatch."""
  rows, t, c = prompts * samples, s.seq_len, s.completion_len
  s.sampling("rollout", prompts, samples)
  s.phase(f"experience forward ({rows} x {t}, {2 + scalar_networks} networks)",
          2 * s.act.forward(rows, t, c) + scalar_networks * s.act.forward(rows, t, 0))
  s.train_step(s.micro_batch, c, critic=critic_train)


def _ppo_stage(s: _Stage) -> None:
  """With LoRA one base serves policy and reference (and a critic on the SFT trunk); a critic
  from the RM adapts the RM's own arrays when the RM is loaded."""
  p = s.section
  critic_full = p.critic in ("reward", "sft")
  has_rm = s.reward_model()
  s.trained("policy")
  critic_shares = p.critic in ("sft", "shared") or (p.critic == "reward" and has_rm)
  s.trained("critic", ValueModel if critic_full else _ValueHeadOnly, base_shared=critic_shares)
  if not s.adapters.enabled:
    s.frozen("reference policy", "policy")
  _online_rl(s, p.data.batch_size, 1, 1 + has_rm, critic_full)


def _group_stage(s: _Stage) -> None:
  """GRPO, RLOO, REINFORCE++: PPO's iteration without a critic, G samples per prompt (the
  prompt's KV cache prefilled once and repeated)."""
  g = s.section
  s.trained("policy")
  if not s.adapters.enabled:  # with LoRA the reference is the trained policy's base
    s.frozen("reference policy", "policy")
  has_rm = s.reward_model()
  _online_rl(s, g.data.batch_size, g.num_generations, int(has_rm), False)


def _dpo_stage(s: _Stage) -> None:
  """The policy's train step on chosen + rejected (logits on the response); the reference's
  log-probs of every pair once at the start (no gradients); held-out samples at the end."""
  bs, t, c = s.section.data.batch_size, s.seq_len, s.completion_len
  s.trained("policy")
  if not s.adapters.enabled:  # with LoRA the reference is the trained policy's base
    s.frozen("reference policy", "policy")
  s.reward_model()  # loaded for the summary's RM score
  s.phase(f"reference log-probs forward ({2 * bs} x {t})", s.act.forward(2 * bs, t, c))
  s.train_step(2 * s.micro_batch, c)
  s.sampling("held-out sampling", bs)


def _best_of_n_stage(s: _Stage) -> None:
  """Nothing trained: max(n) samples of the SFT policy per prompt, each scored."""
  g = s.section
  b, n = g.data.batch_size, max(g.n)
  s.frozen("SFT policy", "policy")
  s.sampling("sampling", b, n)
  if s.reward_model():
    s.phase(f"reward model forward ({b * n} x {s.seq_len})", s.act.forward(b * n, s.seq_len, 0))


_STAGE_MODELS = {"sft": _sft_stage, "rm": _rm_stage, "ppo": _ppo_stage,
                 **{name: _group_stage for name in config_lib.GROUP_STAGES},
                 "dpo": _dpo_stage, "best_of_n": _best_of_n_stage}
MODELLED_STAGES = tuple(_STAGE_MODELS)  # stages `estimate` models: every one of STAGES


def estimate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             stage: str | None = None) -> Estimate:
  """Per-device estimate of `stage` (default: the run's last, `config.stage`) of the run
  `config` on `num_devices` (default: all devices)."""
  stage = stage or config.stage
  if stage not in config_lib.stages_of(config):
    raise ValueError(f"stage {stage!r} is not one of this run's stages "
                     f"{config_lib.stages_of(config)} (config.stage is {config.stage!r}).")
  num_devices = num_devices or jax.device_count()
  mesh = resolve_mesh(config.mesh, num_devices)
  # The shared model decides the network shape of every stage (RM and critic reuse it).
  model_cfg, vocab_source = _model_config(config)
  s = _Stage(config, stage, mesh, model_cfg, Activations(model_cfg, mesh))
  _STAGE_MODELS[stage](s)
  notes = [f"vocab {model_cfg.vocab_size} ({vocab_source})"]
  if model_cfg.moe.num_experts:
    notes.append("MoE: expert weights exact, activations counted as a dense FFN")
  if model_cfg.remat != "none" and not model_cfg.scan_layers:
    notes.append(f"model.remat={model_cfg.remat} counted as none: it needs model.scan_layers "
                 "to save memory for sure")
  counts = dict(sorted(s.counts.items(), key=lambda kv: kv[0] != "policy"))  # policy first
  return Estimate(stage, mesh, s.resident, s.phases, counts, notes)


class _ValueHeadOnly(nnx.Module):
  """What a shared-trunk critic adds to the policy: one value head."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    from rlhf_jax.models.heads import ScalarHead  # pylint: disable=g-import-not-at-top
    self.value_head = ScalarHead(cfg, 0.0, rngs)


def report(est: Estimate, device_bytes: float | None = None) -> str:
  """Human-readable lines; compares with `device_bytes` (default: what a local device reports)."""
  if device_bytes is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    device_bytes = stats.get("bytes_limit")
  mesh = " x ".join(f"{a}={s}" for a, s in est.mesh.items())
  nets = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in est.param_counts.items())
  lines = [f"[{est.stage}] memory per device (estimate; mesh {mesh}; {nets} parameters; "
           f"{'; '.join(est.notes)}):"]
  w = max(42, *(len(p.name) for p in est.resident + est.phases))
  for p in est.resident:
    lines.append(f"  {p.name:<{w}s} {_size(p.bytes)}")
  peak = est.peak_phase
  for p in est.phases:
    lines.append(f"  {p.name:<{w}s} {_size(p.bytes)}{'  <- peak' if p is peak else ''}")
  lines.append(f"  {'total (resident + peak phase)':<{w}s} {_size(est.total_bytes)}")
  if device_bytes:
    verdict = "fits" if est.total_bytes <= 0.9 * device_bytes else (
        f"DOES NOT FIT: add fsdp/tensor devices, {_fix(est.stage)} "
        "or use model.param_dtype=bfloat16")
    lines.append(f"  device memory {device_bytes / GIB:.1f} GiB: {verdict}")
  return "\n".join(lines)


def _fix(stage: str) -> str:
  """The stage's keys that shrink its activations."""
  if stage == "best_of_n":
    return f"lower {stage}.data.batch_size or max({stage}.n)"
  minibatched = stage == "ppo" or stage in config_lib.GROUP_STAGES
  return (f"raise {stage}.optim.grad_accum_steps"
          + (f" or {stage}.num_minibatches" if minibatched else "")
          + f", lower {stage}.data.batch_size"
          + (f" or {stage}.num_generations" if stage in config_lib.GROUP_STAGES else ""))


def _size(n: float) -> str:
  return f"{n / GIB:9.2f} GiB" if n >= GIB else f"{n / 2**20:9.1f} MiB"


def compiled_step_memory(step_fn, *abstract_args) -> dict[str, int]:
  """XLA's own per-device figures for a jitted step on abstract (ShapeDtypeStruct) args:
  compiles, allocates nothing. Keys: argument, output, temp, alias bytes."""
  stats = step_fn.lower(*abstract_args).compile().memory_analysis()
  return {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                                   "alias")}


# Plain data parallelism over whatever devices there are: what `fit_overrides` sets.
DATA_PARALLEL = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.expert": 1}


def update_rows(cfg, stage: str) -> int | None:
  """Rows of one optimizer update of `stage`, which its `grad_accum_steps` micro-batches
  split (RM and DPO: preference pairs); None where nothing is trained (best-of-N)."""
  s = cfg[stage]
  if "optim" not in s:
    return None
  if stage == "ppo":
    return s.data.batch_size // s.num_minibatches
  if stage in config_lib.GROUP_STAGES:
    return s.data.batch_size * s.num_generations // s.num_minibatches
  return s.data.batch_size


def accum_keys(cfg) -> list[str]:
  """The micro-batch key of every stage a run of `cfg` goes through that trains."""
  return [f"{stage}.optim.grad_accum_steps" for stage in config_lib.stages_of(cfg)
          if update_rows(cfg, stage) is not None]


def _micro_batches(rows: int, accum: int, shards: int) -> int:
  """The most micro-batches, at most `accum`, that split `rows` evenly, into a multiple of
  `shards` rows each (as `validate.check_mesh` requires); 1 if none does."""
  while accum > 1 and (rows % accum or (rows // accum) % shards):
    accum -= 1
  return accum


def fit_overrides(config_fn, preset: str, num_devices: int, device_bytes: float | None,
                  base: dict[str, object] | None = None, headroom: float = 0.85
                  ) -> dict[str, object]:
  """Overrides (dotted key -> value): `base`, plus plain data parallelism over `num_devices`
  (the one `mesh`) with the fewest micro-batches (`<stage>.optim.grad_accum_steps`: the same
  in every stage of the run that trains, fewer where a stage's update (`update_rows`) would
  not split into whole rows per device) whose memory estimate stays under `headroom` x
  `device_bytes` in every stage (e.g. a Colab TPU, whatever its generation). Without
  `device_bytes` (CPU), no micro-batching."""
  overrides: dict[str, object] = dict(base or {}, **DATA_PARALLEL)
  if not device_bytes:
    return overrides
  for accum in (1, 2, 4, 8, 16):
    cfg = scale.apply_overrides(config_fn(preset), overrides)  # `base` may set batch sizes
    trial = dict(overrides)
    for key in accum_keys(cfg):
      stage = key.split(".", 1)[0]
      trial[key] = _micro_batches(update_rows(cfg, stage), accum, num_devices)
    scale.apply_overrides(cfg, trial)
    totals = {stage: estimate(cfg, num_devices, stage=stage).total_bytes
              for stage in config_lib.stages_of(cfg)}
    worst = max(totals, key=totals.get)
    if totals[worst] <= headroom * device_bytes:
      return trial
  raise ValueError(f"preset {preset!r} does not fit {num_devices} device(s) of "
                   f"{device_bytes / 2**30:.1f} GiB even with up to 16 micro-batches (the "
                   f"{worst} stage needs {totals[worst] / 2**30:.1f} GiB); choose a smaller "
                   "preset.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  device_bytes = _DEVICE_GIB.value * GIB if _DEVICE_GIB.value else None
  stages = [_STAGE.value] if _STAGE.value else config_lib.stages_of(cfg)
  print("\n\n".join(report(estimate(cfg, _NUM_DEVICES.value or None, stage=stage),
                            device_bytes or 0.0) for stage in stages))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ppo.py:7b.",
                                            lock_config=True)
  _NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices the mesh spans (0: this "
                                      "machine's), e.g. 16 for a TPU v4-32 slice.")
  _DEVICE_GIB = flags.DEFINE_float("device_gib", 0.0, "Memory per device to compare with, "
                                   "in GiB (0: do not compare).")
  _STAGE = flags.DEFINE_enum("stage", "", ["", *config_lib.STAGES], "The stage to estimate "
                             "('': every stage of the config's run, e.g. SFT, RM and PPO "
                             "for configs/ppo.py).")
  flags.mark_flag_as_required("config")
  app.run(main)
