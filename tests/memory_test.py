"""Per-device memory estimate: exact parameter bytes, activations against XLA's own figure,
and the scale presets against published parameter counts and their target machines."""

import dataclasses
import functools
import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import config as config_lib
from rlhf_jax import memory, scale, sharding
from rlhf_jax.stages import dpo, grpo, sft
from rlhf_jax.models import PolicyModel, lora
from rlhf_jax.train import optim, state as state_lib

GIB = 2 ** 30


def _tiny_config(stage, mesh):
  """A run ending with `stage` on a tiny network; 16 rows per train step in every stage."""
  cfg = config_lib.get_config(stage)
  cfg.tokenizer.vocab_size = 512  # divides the tensor axis (the byte vocabulary, 259, does not)
  cfg.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  cfg.data.update(max_prompt_len=32, max_completion_len=32)
  cfg.sft.data.batch_size = 16
  for name in config_lib.GROUP_STAGES:
    if name in cfg:
      cfg[name].update(num_generations=4, num_minibatches=1)
      cfg[name].data.batch_size = 4  # x 4 samples
  if "dpo" in cfg:
    cfg.dpo.data.batch_size = 8  # pairs: chosen + rejected
  cfg.mesh.update(mesh)
  return cfg


def _sft_config(mesh):
  return _tiny_config("sft", mesh)


def _parts(est):
  return {p.name: p.bytes for p in est.resident + est.phases}


def _phase(est, prefix):
  (part,) = [p for p in est.phases if p.name.startswith(prefix)]
  return part


# `_tiny_config`'s networks by hand (LLaMA shape, untied, float32): the embedding V D; per
# layer two norms 2 D, q and o 2 D N H, k and v 2 D K H, SwiGLU 3 D F; the final norm D; then
# the LM head D V (policy) or a scalar head D + 1 (reward model).
_TRUNK = 512 * 128 + 2 * (2 * 128 + 2 * 128 * 4 * 32 + 2 * 128 * 2 * 32 + 3 * 128 * 256) + 128
POLICY_PARAMS = _TRUNK + 128 * 512
RM_PARAMS = _TRUNK + 128 + 1


class CompiledStepTest(absltest.TestCase):
  """A stage's policy train step on a mesh, compiled by XLA (never run): its per-device
  arguments are the train state (+ the batch), its temporaries the gradients and
  activations."""

  def _compiled(self, cfg, stage, loss_fn, batch_shapes):
    """(XLA's figures, mesh, step-counter bytes, batch bytes per device); `batch_shapes`:
    key -> (global shape, dtype), every array split over the batch shards."""
    mesh = sharding.make_mesh(cfg.mesh)
    model_cfg, _ = memory._model_config(cfg)  # pylint: disable=protected-access
    graphdef, params = sharding.init_sharded(lambda: PolicyModel(model_cfg, nnx.Rngs(0)), mesh)
    optim_cfg = cfg[stage].optim
    tx = optim.make_optimizer(optim_cfg)
    state, shardings = state_lib.create_train_state(params, tx, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, len(s)) for k, (s, _) in batch_shapes.items()}
    step = state_lib.make_train_step(graphdef, loss_fn, tx, mesh, shardings, batch_sh,
                                     optim_cfg.grad_accum_steps)
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=batch_sh[k])
             for k, (s, dt) in batch_shapes.items()}
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    batch_bytes = sum(math.prod(s) * jnp.dtype(dt).itemsize
                      for s, dt in batch_shapes.values()) // shards
    # Step counters (train state, AdamW, schedule): int32 scalars beside the parameter-shaped state.
    scalars = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim == 0)
    with sharding.use_mesh(mesh):
      compiled = memory.compiled_step_memory(step.jitted, *step.args(state, batch))
    return compiled, mesh, scalars, batch_bytes

  def _check(self, cfg, stage, loss_fn, batch_shapes, rows):
    compiled, mesh, scalars, batch_bytes = self._compiled(cfg, stage, loss_fn, batch_shapes)
    est = memory.estimate(cfg, mesh.size, stage=stage)
    parts = _parts(est)
    state = parts["policy params"] + parts["policy AdamW moments"]
    self.assertLess(parts["policy params"], 0.3 * 4 * est.param_counts["policy"])
    self.assertEqual(compiled["argument"], state + batch_bytes + scalars, stage)
    analytic = parts["policy grads"] + parts[f"train step activations ({rows} rows x 64)"]
    ratio = compiled["temp"] / analytic
    print(f"{stage} mesh {dict(mesh.shape)}: XLA temp {compiled['temp'] / 2**20:.2f} MiB, "
          f"estimate {analytic / 2**20:.2f} MiB (ratio {ratio:.2f})")
    self.assertBetween(ratio, 0.5, 2.0, stage)

  def test_state_bytes_are_exact_and_activations_close(self):
    mesh_cfg = dict(data=2, fsdp=2, tensor=2)  # every kind of split at once
    cfg = _sft_config(mesh_cfg)
    shapes = {k: ((16, 64), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
    self._check(cfg, "sft", sft.sft_loss, shapes, 16)

  def test_grpo_step(self):
    # B x G = 16 responses of 32 tokens after 32 prompt tokens; logits on the response only.
    cfg = _tiny_config("grpo", dict(data=2, fsdp=2, tensor=2))
    hp = grpo.rl_params(cfg.grpo, cfg.sampling.temperature)
    shapes = {"seq": ((16, 64), jnp.int32), "seq_mask": ((16, 64), jnp.int32),
              "response": ((16, 32), jnp.int32), "mask": ((16, 32), jnp.int32),
              **{k: ((16, 32), jnp.float32) for k in ("old_logp", "ref_logp", "advantages")}}
    self.assertCountEqual(shapes, grpo.EXP_KEYS)
    self._check(cfg, "grpo", lambda m, b: grpo.loss(m, b, hp), shapes, 16)

  def test_dpo_step(self):
    # 8 pairs: one forward over 16 sequences; reference log-probs come in the batch.
    cfg = _tiny_config("dpo", dict(data=2, fsdp=2, tensor=2))
    d = cfg.dpo
    loss_fn = functools.partial(dpo.dpo_loss, prompt_len=32, beta=d.beta, loss_type=d.loss_type,
                                label_smoothing=d.label_smoothing)
    shapes = {**{k: ((8, 64), jnp.int32) for k in dpo.PAIR_KEYS},
              **{k: ((8,), jnp.float32) for k in dpo.REF_KEYS}}
    self._check(cfg, "dpo", loss_fn, shapes, 16)

  def test_sharding_divides_parameters(self):
    one = memory.estimate(_sft_config(dict(data=1)), 1)
    eight = memory.estimate(_sft_config(dict(data=1, fsdp=8)), 8)
    # Everything but the norm scales (replicated) is split eight ways.
    self.assertBetween(one.resident[0].bytes / eight.resident[0].bytes, 7.5, 8.0)
    self.assertEqual(memory.resolve_mesh(dict(data=2, fsdp=-1, num_devices=0), 16),
                     dict(data=2, fsdp=8, tensor=1, expert=1))


class RematTest(absltest.TestCase):
  """`model.remat` and `model.scan_layers` in the estimate, and against XLA's own figure."""

  def _step(self, est):
    return _phase(est, "train step").bytes

  def test_policies_shrink_the_train_step_under_scan(self):
    cfg = _sft_config(dict(data=1))
    # 4 layers: at 2, keeping every matmul output of both plus one layer's whole set for the
    # recomputation ("dots_saveable") holds more than no remat.
    cfg.model.update(num_layers=4, scan_layers=True)
    steps = {}
    for remat in ("none", "dots_saveable", "minimal", "full"):
      cfg.model.remat = remat
      steps[remat] = self._step(memory.estimate(cfg, 1))
    self.assertEqual(list(steps), sorted(steps, key=steps.get, reverse=True))
    # full: per row and token, each of the 4 layers' block input (D = 128 float32) plus one
    # layer's whole set, and the 63 positions' logits; 16 rows x 64 tokens.
    per_layer = 4 * (4 * 128 + (3 * 4 + 3 * 2) * 32 + 4 * 256) + 8 * 4 * 64
    want = 16 * (64 * (4 * 4 * 128 + per_layer) + 63 * 12 * 512)
    self.assertEqual(steps["full"], want)
    # Unscanned, remat is counted as none (XLA may keep the activations), and said so.
    cfg.model.scan_layers = False
    est = memory.estimate(cfg, 1)
    self.assertEqual(self._step(est), steps["none"])
    self.assertIn("model.remat=full counted as none", memory.report(est, GIB))
    # Scanned, the sampler decodes from an unscanned copy of the policy's weights.
    cfg.model.update(num_layers=2, remat="none", scan_layers=True)
    scanned = _phase(memory.estimate(cfg, 1), "eval sampling")
    cfg.model.scan_layers = False
    plain = _phase(memory.estimate(cfg, 1), "eval sampling")
    self.assertIn("unscanned weights", scanned.name)
    self.assertEqual(scanned.bytes - plain.bytes, 4 * POLICY_PARAMS)

  def test_scanned_remat_full_matches_xla(self):
    """XLA's temporaries of a scanned remat-full SFT forward + backward (gradients are its
    output) against the estimate's train-step activations."""
    cfg = _sft_config(dict(data=1))
    cfg.model.update(num_layers=3, remat="full", scan_layers=True)
    cfg.data.update(max_prompt_len=64, max_completion_len=64)
    model_cfg, _ = memory._model_config(cfg)  # pylint: disable=protected-access
    graphdef, params = nnx.split(nnx.eval_shape(lambda: PolicyModel(model_cfg, nnx.Rngs(0))))
    batch = {k: jax.ShapeDtypeStruct((4, 128), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
    grads = jax.jit(lambda p, b: jax.grad(
        lambda p: sft.sft_loss(nnx.merge(graphdef, p), b)[0])(p))
    temp = memory.compiled_step_memory(grads, params, batch)["temp"]
    cfg.sft.data.batch_size = 4
    estimate = self._step(memory.estimate(cfg, 1))
    print(f"scanned remat=full: XLA temp {temp / 2**20:.2f} MiB, estimate "
          f"{estimate / 2**20:.2f} MiB")
    self.assertBetween(temp / estimate, 0.8, 1.25)  # 1.0 measured


class NewStagesTest(absltest.TestCase):
  """GRPO / RLOO / REINFORCE++, DPO and best-of-N: which networks each holds, and how its
  phases follow its batch."""

  def test_every_stage_is_modelled(self):
    self.assertCountEqual(memory.MODELLED_STAGES, config_lib.STAGES)
    for stage in config_lib.STAGES:
      cfg = config_lib.get_config(stage, "test")
      for s in config_lib.stages_of(cfg):
        est = memory.estimate(cfg, 1, stage=s)
        self.assertEqual(est.stage, s)
        self.assertGreater(est.total_bytes, sum(p.bytes for p in est.resident))
        self.assertIn(f"[{s}] memory per device", memory.report(est, 16 * GIB))

  def test_group_stage_parameter_bytes(self):
    cfg = _tiny_config("grpo", dict(data=1))
    n_policy, n_rm = POLICY_PARAMS, RM_PARAMS
    est = memory.estimate(cfg, 1)
    self.assertEqual(est.param_counts, {"policy": n_policy, "reward model": n_rm})
    # float32: trained policy (params, grads, 2 AdamW moments), frozen reference, frozen RM.
    self.assertEqual(sum(p.bytes for p in est.resident), 4 * (5 * n_policy + n_rm))
    self.assertEqual(_parts(est)["policy AdamW moments"], 8 * n_policy)
    self.assertEqual(_parts(est)["reference policy params (frozen)"], 4 * n_policy)
    self.assertNotIn("critic", est.param_counts)
    # Scored by the gold reward: no RM; rollout, experience and train step as before.
    cfg.grpo.reward = "gold"
    gold = memory.estimate(cfg, 1)
    self.assertEqual(gold.param_counts, {"policy": n_policy})
    self.assertEqual(sum(p.bytes for p in gold.resident), 4 * 5 * n_policy)
    self.assertFalse([p for p in gold.resident if "reward" in p.name])
    self.assertLess(_phase(gold, "experience").bytes, _phase(est, "experience").bytes)
    self.assertEqual(_phase(gold, "train step").bytes, _phase(est, "train step").bytes)
    # RLOO and REINFORCE++ hold the same networks; fsdp splits them as it does SFT's.
    for stage in ("rloo", "reinforce_pp"):
      other = memory.estimate(_tiny_config(stage, dict(data=1)), 1)
      self.assertEqual(sum(p.bytes for p in other.resident), 4 * (5 * n_policy + n_rm))
    split = memory.estimate(_tiny_config("grpo", dict(data=1, fsdp=8)), 8)
    self.assertBetween(_parts(est)["policy params"] / _parts(split)["policy params"], 7.5, 8.0)

  def test_group_stage_phases_follow_the_group(self):
    cfg = _tiny_config("grpo", dict(data=1))  # 4 prompts x 4 samples
    est = memory.estimate(cfg, 1)
    self.assertEqual(_phase(est, "rollout").name, "rollout (4 prompts x 4: KV cache + prefill)")
    self.assertIn("(16 x 64, 3 networks)", _phase(est, "experience").name)
    # The micro-batch: B x G / num_minibatches / grad_accum_steps rows.
    cfg.grpo.update(num_minibatches=2)
    cfg.grpo.optim.grad_accum_steps = 2
    micro = memory.estimate(cfg, 1)
    self.assertEqual(_phase(micro, "train step").name, "train step activations (4 rows x 64)")
    self.assertAlmostEqual(_phase(micro, "train step").bytes,
                           _phase(est, "train step").bytes / 4)
    self.assertIn("policy grad accumulator", _parts(micro))
    # Twice the samples per prompt: the KV cache of 16 more rows (2 L T K H each), the same
    # prefill of the 4 prompts.
    cfg.grpo.num_generations = 8
    more = memory.estimate(cfg, 1)
    model_cfg, _ = memory._model_config(cfg)  # pylint: disable=protected-access
    dt = jnp.dtype(model_cfg.jnp_dtype).itemsize
    self.assertEqual(_phase(more, "rollout").bytes - _phase(est, "rollout").bytes,
                     16 * 2 * 2 * 64 * 2 * 32 * dt)

  def test_dpo_networks_and_peak_grows_with_batch(self):
    cfg = _tiny_config("dpo", dict(data=1))
    n_policy, n_rm = POLICY_PARAMS, RM_PARAMS
    est = memory.estimate(cfg, 1)
    self.assertEqual(sum(p.bytes for p in est.resident), 4 * (5 * n_policy + n_rm))
    cfg.dpo.reward = "none"
    self.assertEqual(sum(p.bytes for p in memory.estimate(cfg, 1).resident), 4 * 5 * n_policy)
    totals = []
    for bs in (4, 8, 16, 32):
      cfg.dpo.data.batch_size = bs
      e = memory.estimate(cfg, 1)
      self.assertEqual(e.peak_phase.name, f"train step activations ({2 * bs} rows x 64)")
      totals.append(e.total_bytes)
    self.assertEqual(totals, sorted(set(totals)))
    # Micro-batches shrink the train step, not the once-only reference forward.
    cfg.dpo.optim.grad_accum_steps = 4
    accum = memory.estimate(cfg, 1)
    self.assertEqual(_phase(accum, "train step").name, "train step activations (16 rows x 64)")
    self.assertEqual(_phase(accum, "reference log-probs").bytes,
                     _phase(e, "reference log-probs").bytes)
    self.assertLess(accum.total_bytes, totals[-1])

  def test_best_of_n_trains_nothing(self):
    cfg = _tiny_config("best_of_n", dict(data=1))
    cfg.best_of_n.data.batch_size = 4
    cfg.best_of_n.n = (1, 4, 16)
    n_policy, n_rm = POLICY_PARAMS, RM_PARAMS
    est = memory.estimate(cfg, 1)
    self.assertEqual([p.name for p in est.resident],
                     ["SFT policy params (frozen)", "reward model params (frozen)"])
    self.assertEqual(sum(p.bytes for p in est.resident), 4 * (n_policy + n_rm))
    self.assertEqual(_phase(est, "sampling").name, "sampling (4 prompts x 16: KV cache + prefill)")
    self.assertIn("(64 x 64)", _phase(est, "reward model forward").name)
    cfg.best_of_n.reward = "gold"
    gold = memory.estimate(cfg, 1)
    self.assertEqual([p.name for p in gold.phases], [_phase(est, "sampling").name])
    self.assertNotIn("best_of_n.optim.grad_accum_steps", memory.accum_keys(cfg))
    self.assertIn("max(best_of_n.n)", memory.report(est, 1024))


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
      for last in config_lib.STAGES:
        cfg = config_lib.get_config(last, preset)
        for stage in config_lib.stages_of(cfg):
          est = memory.estimate(cfg, n, stage=stage)
          self.assertEqual(est.stage, stage)
          self.assertEqual(memory.resolve_mesh(cfg.mesh, n), est.mesh)
          self.assertEqual(est.mesh["data"] * est.mesh["fsdp"], n, preset)
          self.assertLessEqual(est.total_bytes, 0.9 * gib * GIB, f"{preset} {stage}")
          self.assertIn("fits", memory.report(est, gib * GIB))
          # The preset sets a stage alike whichever stages follow it in the run.
          full_run = config_lib.get_config(stage if stage not in ("sft", "rm") else "ppo",
                                           preset)
          self.assertEqual(est.total_bytes,
                           memory.estimate(full_run, n, stage=stage).total_bytes,
                           f"{preset} {stage} of configs/{cfg.stage}.py")

  def test_lora_counts_adapters_and_shares_the_base(self):
    """7b-1gpu fits only with LoRA: adapters and heads trained, one base for policy and
    reference, the critic on the RM's own arrays; the counts are the network's own."""
    cfg = config_lib.ppo_config("7b-1gpu")
    self.assertEqual(cfg.lora.rank, 16)
    est = memory.estimate(cfg, 1, stage="ppo")
    names = [p.name for p in est.resident]
    self.assertNotIn("reference policy params (frozen)", names)
    self.assertIn("policy base params (frozen)", names)
    self.assertNotIn("critic base params (frozen)", names)  # the RM's arrays
    self.assertIn("policy adapters + heads AdamW moments", names)
    # The counts are the network's own (at 125m: building 7B twice costs seconds).
    small = config_lib.ppo_config("125m-1gpu")
    small.lora.update(rank=8, targets="q,v,down")
    est = memory.estimate(small, 1, stage="ppo")
    model_cfg = dataclasses.replace(memory._model_config(small)[0],  # pylint: disable=protected-access
                                    lora=lora.LoRAConfig.from_config(small.lora))
    _, abstract = nnx.split(nnx.eval_shape(lambda: PolicyModel(model_cfg, nnx.Rngs(0))))
    trained = sum(math.prod(v.shape) for p, v in nnx.to_flat_state(abstract)
                  if lora.is_trainable(p))
    self.assertEqual(est.param_counts["policy trained (LoRA)"], trained)
    small.lora.rank = 0
    full = memory.estimate(small, 1, stage="ppo")
    self.assertGreater(full.total_bytes - est.total_bytes, 3.5 * GIB)  # 13.8 vs 10.2 GiB

  def test_preset_errors_name_the_fix(self):
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
    # The new stages: a micro-batch key for each stage that trains (not best-of-N), each
    # splitting its update (group stages: B x G / num_minibatches rows) into whole rows per
    # device.
    for stage in ("grpo", "dpo", "best_of_n"):
      config_fn = functools.partial(config_lib.get_config, stage)
      for devices, gib in ((8, 8), (1, 16)):
        overrides = memory.fit_overrides(config_fn, "125m", devices, gib * GIB)
        cfg = scale.apply_overrides(config_fn("125m"), overrides)
        trained = [s for s in config_lib.stages_of(cfg) if s != "best_of_n"]
        self.assertCountEqual(memory.accum_keys(cfg),
                              [f"{s}.optim.grad_accum_steps" for s in trained])
        for s in config_lib.stages_of(cfg):
          self.assertLessEqual(memory.estimate(cfg, devices, stage=s).total_bytes,
                               0.85 * gib * GIB, (stage, s))
        if devices == 8:  # 8 GiB each holds 125m without micro-batches
          self.assertEqual([cfg[s].optim.grad_accum_steps for s in trained], [1] * len(trained))
        for s in trained:  # whole rows per device in every micro-batch
          accum = cfg[s].optim.grad_accum_steps
          self.assertEqual(memory.update_rows(cfg, s) % (devices * accum), 0, (stage, s))
    self.assertEqual(memory.update_rows(config_lib.get_config("grpo", "test"), "grpo"), 32)
    # At most the asked micro-batches, each a multiple of the devices' rows.
    self.assertEqual(memory._micro_batches(64, 16, 8), 8)  # pylint: disable=protected-access
    self.assertEqual(memory._micro_batches(48, 16, 2), 12)  # pylint: disable=protected-access
    self.assertEqual(memory._micro_batches(16, 4, 16), 1)  # pylint: disable=protected-access
    with self.assertRaisesRegex(KeyError, "no key 'mesh.dta'"):
      scale.apply_overrides(config_lib.sft_config("test"), {"mesh.dta": 2})


if __name__ == "__main__":
  absltest.main()
