"""Per-device memory estimate: exact parameter bytes, activations against XLA's own figure,
and the scale presets against published parameter counts and their target machines."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import config as config_lib
from rlhf_jax import memory, scale, sharding
from rlhf_jax.stages import sft
from rlhf_jax.models import PolicyModel
from rlhf_jax.train import optim, state as state_lib

GIB = 2 ** 30


def _sft_config(mesh):
  cfg = config_lib.sft_config("")
  cfg.tokenizer.vocab_size = 512  # divides the tensor axis (the byte vocabulary, 259, does not)
  cfg.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  cfg.data.update(max_prompt_len=32, max_completion_len=32)
  cfg.sft.data.batch_size = 16
  cfg.mesh.update(mesh)
  return cfg


class CompiledStepTest(absltest.TestCase):
  """The SFT train step on a mesh, compiled by XLA (never run): its per-device arguments are
  the train state (+ the batch), its temporaries the gradients and activations."""

  def _compiled(self, cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    model_cfg, _ = memory._model_config(cfg)  # pylint: disable=protected-access
    graphdef, params = sharding.init_sharded(lambda: PolicyModel(model_cfg, nnx.Rngs(0)), mesh)
    tx = optim.make_optimizer(cfg.sft.optim)
    state, shardings = state_lib.create_train_state(params, tx, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("tokens", "mask", "loss_mask")}
    step = state_lib.make_train_step(graphdef, sft.sft_loss, tx, mesh, shardings, batch_sh)
    t = cfg.data.max_prompt_len + cfg.data.max_completion_len
    batch = {k: jax.ShapeDtypeStruct((cfg.sft.data.batch_size, t), jnp.int32, sharding=s)
             for k, s in batch_sh.items()}
    # Step counters (train state, AdamW, schedule): int32 scalars beside the parameter-shaped state.
    scalars = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim == 0)
    with sharding.use_mesh(mesh):
      return memory.compiled_step_memory(step.jitted, state, batch), mesh, scalars

  def test_state_bytes_are_exact_and_activations_close(self):
    for mesh_cfg in (dict(data=2, fsdp=2, tensor=2),):  # every kind of split at once
      cfg = _sft_config(mesh_cfg)
      compiled, mesh, scalars = self._compiled(cfg)
      est = memory.estimate(cfg, mesh.size)
      parts = {p.name: p.bytes for p in est.resident + est.phases}
      state = parts["policy params"] + parts["policy AdamW moments"]
      batch_bytes = (3 * 4 * cfg.sft.data.batch_size * 64 // mesh.shape["data"]
                     // mesh.shape["fsdp"])
      self.assertLess(parts["policy params"], 0.3 * 4 * est.param_counts["policy"])
      self.assertEqual(compiled["argument"], state + batch_bytes + scalars, mesh_cfg)
      analytic = parts["policy grads"] + parts["train step activations (16 rows x 64)"]
      ratio = compiled["temp"] / analytic
      print(f"mesh {dict(mesh.shape)}: XLA temp {compiled['temp'] / 2**20:.2f} MiB, estimate "
            f"{analytic / 2**20:.2f} MiB (ratio {ratio:.2f})")
      self.assertBetween(ratio, 0.5, 2.0)

  def test_sharding_divides_parameters(self):
    one = memory.estimate(_sft_config(dict(data=1)), 1)
    eight = memory.estimate(_sft_config(dict(data=1, fsdp=8)), 8)
    # Everything but the norm scales (replicated) is split eight ways.
    self.assertBetween(one.resident[0].bytes / eight.resident[0].bytes, 7.5, 8.0)
    self.assertEqual(memory.resolve_mesh(dict(data=2, fsdp=-1, num_devices=0), 16),
                     dict(data=2, fsdp=8, tensor=1, expert=1))


class ScalePresetTest(absltest.TestCase):

  def test_parameter_counts_match_the_published_models(self):
    # LLaMA-2-7B and TinyLlama-1.1B as Hugging Face counts them; 125m: untied GPT-3-small shape.
    for preset, count in (("7b", 6_738_415_616), ("1b", 1_100_048_384), ("125m", 134_105_856)):
      est = memory.estimate(config_lib.sft_config(preset), 8)
      self.assertEqual(est.param_counts["policy"], count, preset)

  def test_presets_fit_their_targets(self):
    for (size, target) in scale.TUNED:
      n, gib = scale.HARDWARE[target]
      preset = f"{size}-{target}"
      full_run = config_lib.ppo_config(preset)
      for config_fn in (config_lib.sft_config, config_lib.rm_config, config_lib.ppo_config):
        cfg = config_fn(preset)
        for stage in config_lib.stages_of(cfg):
          est = memory.estimate(cfg, n, stage=stage)
          self.assertEqual(est.stage, stage)
          self.assertEqual(memory.resolve_mesh(cfg.mesh, n), est.mesh)
          self.assertEqual(est.mesh["data"] * est.mesh["fsdp"], n, preset)
          self.assertLessEqual(est.total_bytes, 0.9 * gib * GIB, f"{preset} {stage}")
          self.assertIn("fits", memory.report(est, gib * GIB))
          # The preset sets a stage alike whichever stages follow it in the run.
          self.assertEqual(est.total_bytes,
                           memory.estimate(full_run, n, stage=stage).total_bytes,
                           f"{preset} {stage} of configs/{cfg.stage}.py")

  def test_preset_errors_name_the_fix(self):
    with self.assertRaisesRegex(ValueError, "7b-1gpu.*does not fit.*use 7b-8gpu"):
      config_lib.ppo_config("7b-1gpu")
    with self.assertRaisesRegex(ValueError, "choose a size .* optionally with a target"):
      config_lib.sft_config("7b-a100")
    small = memory.estimate(config_lib.ppo_config("7b-8gpu"), 8)  # the run's last stage
    self.assertEqual(small.stage, "ppo")
    self.assertIn("DOES NOT FIT", memory.report(small, 16 * GIB))
    self.assertIn("ppo.optim.grad_accum_steps", memory.report(small, 16 * GIB))
    with self.assertRaisesRegex(ValueError, "'ppo' is not one of this run's stages"):
      memory.estimate(config_lib.sft_config("test"), 1, stage="ppo")

  def test_fit_overrides_for_colab_tpus(self):
    base = {f"data.{k}": 24 for k in ("max_prompt_len", "max_completion_len")}  # shared
    for devices, gib in ((8, 8), (1, 16)):  # TPU v2-8 cores; one v5e chip
      overrides = memory.fit_overrides(config_lib.ppo_config, "125m", devices, gib * GIB, base)
      cfg = scale.apply_overrides(config_lib.ppo_config("125m"), overrides)
      self.assertEqual(cfg.data.max_prompt_len, 24)
      self.assertEqual(cfg.mesh.data, -1)  # the one mesh, for every stage
      self.assertEqual(config_lib.stages_of(cfg), ("sft", "rm", "ppo"))
      for stage in config_lib.stages_of(cfg):
        self.assertIn(f"{stage}.optim.grad_accum_steps", overrides)
        self.assertLessEqual(memory.estimate(cfg, devices, stage=stage).total_bytes,
                             0.85 * gib * GIB, stage)
    with self.assertRaisesRegex(ValueError, "does not fit 1 device"):
      memory.fit_overrides(config_lib.ppo_config, "7b", 1, 16 * GIB)
    with self.assertRaisesRegex(KeyError, "no key 'mesh.dta'"):
      scale.apply_overrides(config_lib.sft_config("test"), {"mesh.dta": 2})


if __name__ == "__main__":
  absltest.main()
