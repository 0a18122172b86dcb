"""Scale presets: LLaMA-shaped networks of ~125M, ~1.1B and ~7B parameters, with a mesh and
memory settings for each target machine.

    --config=configs/ppo.py:1b            fsdp over every device (any machine)
    --config=configs/ppo.py:1b-8gpu       the tuned settings for 8 x 80 GB GPUs
    --config=configs/sft.py:7b-v5e-16     ... for a TPU v5e-16 slice (16 chips x 16 GiB)

Targets: `1gpu` (one 80 GB A100/H100), `8gpu` (one node of 8), `v4-32` (TPU v4-32: 16 chips
of 32 GiB, 4 hosts) and `v5e-16` (16 chips of 16 GiB, 4 hosts). `python -m rlhf_jax.memory
--config=configs/ppo.py:7b-8gpu --num_devices=8 --device_gib=80` prints the per-device
estimate of every stage of a preset's run on its machine without needing the machine; README
lists them.

A preset sets the shared sections once (`model`, `tokenizer`, `data.max_prompt_len` /
`data.max_completion_len` = 128 / 128, the one `mesh`) and, in each stage section the run
has, its batch size (`sft.data.batch_size`, `rm.data.batch_size` and
`rm.data.generation_batch_size`, `ppo.data.batch_size` with `ppo.num_minibatches`, the same
64 responses for GRPO / RLOO / REINFORCE++, 64 pairs for DPO), learning rate and micro-batches (`<stage>.optim.learning_rate`, `<stage>.optim.grad_accum_steps`).

The shapes are LLaMA's (vocabulary 32000): 125m is GPT-3-small sized (d 768, 12 layers),
1b is TinyLlama-1.1B, 7b is LLaMA-2-7B. On the bundled task the tokenizer is a 32000-piece
SentencePiece model trained on the fly and the networks start from scratch; for real work
start SFT from a checkpoint of that shape (`--config.init_from=DIR` with
`--config.tokenizer.kind=hf --config.tokenizer.model_path=DIR`), which then decides the
architecture.
"""

from __future__ import annotations

import ml_collections

SIZES = {
    "125m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048),
    "1b": dict(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, mlp_dim=5632),
    "7b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
}
HARDWARE = {  # devices, GiB per device
    "1gpu": (1, 80), "8gpu": (8, 80), "v4-32": (16, 32), "v5e-16": (16, 16),
}
# Sizes whose presets scan their layers (`model.scan_layers`): the train step compiles one
# block instead of 22 / 32 (on CPU, AOT compile of a 22-layer SFT step: see README).
SCANNED = ("1b", "7b")
# Per (size, target): mesh, micro-batches per update (`grad_accum`), `bf16` (parameters,
# hence AdamW moments, in bfloat16) and `remat` (`model.remat`, default "none"): the first
# setting, preferring plain data parallelism, float32 master weights, no accumulation and no
# rematerialisation, whose estimate (`memory.py`) stays under 85-90% of the device memory for
# every stage; the README lists the figures. Except: under fsdp, where every micro-batch
# gathers every weight again, remat "minimal" (attention and elementwise ops recomputed, the
# projections kept) replaces micro-batches.
TUNED = {
    ("125m", "1gpu"): dict(mesh=dict(data=1), grad_accum=1),
    ("125m", "8gpu"): dict(mesh=dict(data=8), grad_accum=1),
    ("125m", "v4-32"): dict(mesh=dict(data=16), grad_accum=1),
    ("125m", "v5e-16"): dict(mesh=dict(data=16), grad_accum=1),
    ("1b", "1gpu"): dict(mesh=dict(data=1), grad_accum=4),
    ("1b", "8gpu"): dict(mesh=dict(data=8), grad_accum=1),
    ("1b", "v4-32"): dict(mesh=dict(fsdp=16), grad_accum=1),
    ("1b", "v5e-16"): dict(mesh=dict(fsdp=16), grad_accum=1),
    ("7b", "8gpu"): dict(mesh=dict(fsdp=8), grad_accum=1),
    ("7b", "v4-32"): dict(mesh=dict(fsdp=16), grad_accum=1),
    ("7b", "v5e-16"): dict(mesh=dict(fsdp=16), grad_accum=1, bf16=True, remat="minimal"),
    # Full fine-tuning does not fit one GPU: PPO's four 7B networks with gradients and AdamW
    # take ~124 GiB even in bfloat16 (~146 GiB at the peak with remat full), the RM stage
    # ~84 GiB. LoRA (rank 16, every stage) trains adapters on one frozen bfloat16 base that
    # the reference (and PPO's critic, on the RM) shares.
    ("7b", "1gpu"): dict(mesh=dict(data=1), grad_accum=4, bf16=True, remat="full", lora=16),
}
NAMES = tuple(SIZES) + tuple(f"{s}-{h}" for s in SIZES for h in HARDWARE if (s, h) in TUNED)

# Learning rates of fine-tuning a pretrained network of that size (SFT, RM, PPO).
_LR = {"125m": (1e-4, 3e-5, 3e-6), "1b": (5e-5, 2e-5, 2e-6), "7b": (2e-5, 1e-5, 1e-6)}


def is_scale_preset(preset: str) -> bool:
  return preset.split("-", 1)[0] in SIZES


def _parse(preset: str) -> tuple[str, str | None, dict]:
  size, _, target = preset.partition("-")
  if size not in SIZES or (target and target not in HARDWARE):
    raise ValueError(f"unknown scale preset {preset!r}; choose a size {tuple(SIZES)}, optionally "
                     f"with a target {tuple(HARDWARE)}, e.g. '7b-8gpu'.")
  tuned = TUNED[(size, target)] if target else dict(mesh=dict(fsdp=-1), grad_accum=1)
  return size, target or None, tuned


def apply(c: ml_collections.ConfigDict, preset: str) -> None:
  """Sets `preset` on the config of a run: the shared sections, and each stage section `c`
  has (`sft`; `sft` and `rm`; or all three)."""
  size, _, tuned = _parse(preset)
  lr_sft, lr_rm, lr_ppo = _LR[size]
  if tuned.get("lora"):  # adapters learn at ~10x the full fine-tuning rates (LoRA, PEFT)
    c.lora.update(rank=tuned["lora"], alpha=2.0 * tuned["lora"], stages="all")
    lr_sft, lr_rm, lr_ppo = 10 * lr_sft, 10 * lr_rm, 10 * lr_ppo
  c.model.update(SIZES[size])
  c.model.update(scan_layers=size in SCANNED, remat=tuned.get("remat", "none"))
  c.model.update(rope_theta=10_000.0, rms_norm_eps=1e-5, dtype="bfloat16",
                 param_dtype="bfloat16" if tuned.get("bf16") else "float32")
  c.tokenizer.update(kind="sentencepiece", vocab_size=32000)
  c.data.update(max_prompt_len=128, max_completion_len=128)
  # A target's mesh is fixed (no -1): on another machine the mesh error says so, rather than
  # a layout the memory estimate did not check running out of memory later.
  c.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  c.mesh.update(tuned["mesh"])
  c.sft.data.batch_size = 64
  c.sft.optim.update(learning_rate=lr_sft, warmup_steps=50, decay_steps=1000,
                     grad_accum_steps=tuned["grad_accum"])
  c.sft.train.update(num_steps=1000, log_every=10, eval_every=250, checkpoint_every=250)
  if "rm" in c:
    c.rm.data.update(batch_size=64, generation_batch_size=64)
    c.rm.optim.update(learning_rate=lr_rm, grad_accum_steps=tuned["grad_accum"])
  # A micro-batch needs a row per batch shard: split a minibatch no further than that.
  shards = max(c.mesh.data * c.mesh.fsdp * c.mesh.expert, 1)
  accum = lambda rows: max(1, min(tuned["grad_accum"], rows // shards))
  if "ppo" in c:
    c.ppo.data.batch_size = 64
    c.ppo.num_minibatches = 4
    c.ppo.optim.update(learning_rate=lr_ppo, grad_accum_steps=accum(64 // 4))
  for name in ("grpo", "rloo", "reinforce_pp"):  # 64 responses per iteration, as PPO
    if name in c:
      g = c[name]
      g.num_minibatches = 4
      g.optim.update(learning_rate=lr_ppo,
                     grad_accum_steps=accum(g.data.batch_size * g.num_generations // 4))
  if "dpo" in c:  # 64 pairs: 128 sequences per update
    c.dpo.data.batch_size = 64
    c.dpo.optim.update(learning_rate=lr_ppo, grad_accum_steps=accum(64))


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def apply_overrides(cfg, overrides: dict[str, object]):
  """Sets dotted keys as `--config.<key>=<value>` would (a missing key is an error)."""
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition(".")
    node = _get(cfg, parent) if parent else cfg
    if leaf not in node:
      raise KeyError(f"config has no key {key!r}.")
    node[leaf] = value
  return cfg

