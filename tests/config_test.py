"""The one config of a run: shared keys reach every stage, every enum and cross-field
constraint is refused before any stage runs, with a one-line error naming the key."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

import testing
from rlhf_jax import config as config_lib
from rlhf_jax import pipeline, scale, sharding, validate


def _mesh_of(params):
  return dict(jax.tree.leaves(params)[0].sharding.mesh.shape)


class SharedKeysTest(absltest.TestCase):

  def test_a_shared_key_set_once_reaches_every_stage(self):
    """`data.max_prompt_len`, `model.d_model` and `mesh.*`, each set once as on the command
    line, are what SFT, preference generation, the RM and PPO all use."""
    cfg = config_lib.ppo_config("test")
    scale.apply_overrides(cfg, {
        "data.max_prompt_len": 12,  # shorter than many sort prompts: some are truncated
        "model.d_model": 48, "mesh.data": 4, "mesh.fsdp": 2, "mesh.num_devices": 8,
        "sft.train.num_steps": 4, "sft.train.eval_every": 0,
        # 4 SFT steps sample near-random text, often tied in gold reward: keep ties.
        "rm.data.num_train_prompts": 64, "rm.data.num_eval_prompts": 32, "rm.data.drop_ties": False,
        "rm.normalize.num_samples": 32, "rm.train.num_steps": 2, "rm.train.eval_every": 0,
        "ppo.num_iterations": 1, "ppo.data.num_eval_prompts": 16})
    with tempfile.TemporaryDirectory() as wd:
      out = pipeline.run(cfg, wd, keep_states=True)
      with open(os.path.join(wd, "rm", "preferences_train.settings.json")) as f:
        settings = json.load(f)
    sft, rm, ppo = (out.stages[k] for k in ("sft", "rm", "ppo"))
    mesh = dict(data=4, fsdp=2, tensor=1, expert=1)
    for name, params in (("sft", sft.state.params), ("rm", rm.state.params),
                         ("ppo", ppo.state.params)):
      self.assertEqual(_mesh_of(params), mesh, name)
      embeds = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
                if "embed" in jax.tree_util.keystr(p)]
      self.assertNotEmpty(embeds, name)
      for x in embeds:
        self.assertEqual(x.shape[-1], 48, name)
    self.assertGreater(sft.metrics["truncated_prompts"], 0)  # SFT: prompts cut to 12 tokens
    self.assertEqual(settings["max_prompt_len"], 12)  # preference generation
    self.assertGreater(rm.metrics["data/train_truncated_prompts"], 0)  # the RM's pairs
    _, args = ppo.programs.calls["experience"]  # PPO: prompt + response positions
    self.assertEqual(args[2]["seq"].shape, (16, 12 + cfg.data.max_completion_len))


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("critic", {"ppo.critic": "value"}, r"ppo.critic is 'value'; choose one of"),
      ("reward", {"ppo.reward": "vader"}, r"ppo.reward is 'vader'; choose one of \('model'"),
      ("gold_needs_critic", {"ppo.reward": "gold"}, "ppo.critic=sft or shared"),
      ("kl", {"ppo.kl_estimator": "k4"}, r"ppo.kl_estimator is 'k4'; choose one of \('k1', 'k2', "
       r"'k3'\)"),
      ("advantage", {"ppo.advantage_estimator": "td"}, r"ppo.advantage_estimator is 'td'"),
      ("advantage_group", {"ppo.advantage_estimator": "grpo"}, r"ppo.advantage_estimator is "
       r"'grpo': it is registered for critic-free training"),
      ("policy_loss", {"ppo.policy_loss": "x"}, r"ppo.policy_loss is 'x'"),
      ("minibatches", {"ppo.num_minibatches": 3}, "must divide by ppo.num_minibatches 3"),
      ("accum", {"ppo.optim.grad_accum_steps": 3}, "ppo.optim.grad_accum_steps=3"),
      ("prompts", {"ppo.data.prompts_path": "p.jsonl"}, "ppo.data.eval_prompts_path is not"),
      ("schedule", {"rm.optim.schedule": "step"}, r"rm.optim.schedule is 'step'"),
      ("decay", {"sft.optim.decay_steps": 1}, r"sft.optim.decay_steps \(1\) must exceed"),
      ("rm_init", {"rm.init": "random"}, r"rm.init is 'random'"),
      ("bad_pairs", {"rm.data.bad_pairs": "skip"}, r"rm.data.bad_pairs is 'skip'"),
      ("samples", {"rm.data.samples_per_prompt": 3}, "even and >= 2, got 3"),
      ("loss_on", {"sft.data.loss_on": "prompt"}, r"sft.data.loss_on is 'prompt'"),
      ("eval_path", {"sft.data.train_path": "a.jsonl"}, "sft.data.eval_path is not"),
      ("task", {"data.task": "chess"}, r"data.task is 'chess'"),
      ("truncation", {"data.truncation": "wrap"}, r"data.truncation is 'wrap'"),
      ("tokenizer", {"tokenizer.kind": "bpe"}, r"tokenizer.kind is 'bpe'"),
      ("chat", {"tokenizer.chat": True}, "tokenizer.chat needs a chat template"),
      ("model", {"model.num_kv_heads": 3}, "model config"),
      ("sampling", {"sampling.top_p": 0.0}, "0 < top_p <= 1"),
      ("keep_checkpoints", {"sft.train.keep_checkpoints": 0}, r"sft.train.keep_checkpoints must "
       r"be >= 1, got 0"),
      ("num_steps", {"rm.train.num_steps": 0}, "rm.train.num_steps must be positive, got 0"),
      ("num_steps_negative", {"sft.train.num_steps": -3}, "sft.train.num_steps must be positive"),
      ("iterations", {"ppo.num_iterations": 0}, "ppo.num_iterations must be positive"),
      ("batch", {"sft.data.batch_size": 0}, "sft.data.batch_size must be positive, got 0"),
      ("log_every", {"rm.train.log_every": 0}, "rm.train.log_every must be >= 1, got 0"),
      ("prompt_len", {"data.max_prompt_len": 0}, "data.max_prompt_len must be positive, got 0"),
      ("lr_inf", {"sft.optim.learning_rate": float("inf")}, "must be finite and >= 0"),
      ("lr_negative", {"ppo.optim.learning_rate": -1e-4}, "must be finite and >= 0"),
      ("retrain", {"retrain": "dpo"}, r"retrain is 'dpo'; choose one of \('', 'sft', 'rm', 'ppo'\)"),
      ("ppo_top_k", {"sampling.top_k": 5}, "unset sampling.top_k, sampling.top_p and "
       "sampling.min_new_tokens"),
      ("ppo_top_p", {"sampling.top_p": 0.9}, "for RL"),
      ("ppo_min_new_tokens", {"sampling.min_new_tokens": 2}, "for RL"),
  )
  def test_bad_setting_is_one_line_naming_the_key(self, overrides, message):
    cfg = scale.apply_overrides(config_lib.ppo_config("test"), overrides)
    with self.assertRaisesRegex(ValueError, message) as raised:
      validate.check(cfg)
    self.assertNotIn("\n", str(raised.exception))

  @parameterized.named_parameters(
      ("dpo_loss", "dpo", {"dpo.loss_type": "kto"}, r"dpo.loss_type is 'kto'"),
      ("dpo_beta", "dpo", {"dpo.beta": 0.0}, "dpo.beta must be positive"),
      ("cdpo_ipo", "dpo", {"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1},
       "applies to dpo.loss_type='dpo'"),
      ("cdpo_range", "dpo", {"dpo.label_smoothing": 0.5}, r"in \[0, 0.5\)"),
      ("dpo_reward", "dpo", {"dpo.reward": "gold"}, r"dpo.reward is 'gold'"),
      ("dpo_files", "dpo", {"dpo.data.train_path": "p.jsonl"}, "dpo.data.eval_path is not"),
      ("bon_n", "best_of_n", {"best_of_n.n": (4, 2)}, "best_of_n.n must be increasing"),
      ("bon_reward", "best_of_n", {"best_of_n.reward": "none"}, r"best_of_n.reward is 'none'"),
      ("rloo_group", "rloo", {"rloo.num_generations": 1}, "rloo.num_generations is 1"),
      ("rpp_estimator", "reinforce_pp", {"reinforce_pp.advantage_estimator": "gae"},
       r"reinforce_pp.advantage_estimator is 'gae'"),
      ("rpp_top_k", "reinforce_pp", {"sampling.top_k": 5}, "REINFORCE_PP samples"),
  )
  def test_bad_setting_of_the_algorithm_family(self, stage, overrides, message):
    cfg = scale.apply_overrides(config_lib.get_config(stage, "test"), overrides)
    with self.assertRaisesRegex(ValueError, message) as raised:
      validate.check(cfg)
    self.assertNotIn("\n", str(raised.exception))

  def test_algorithm_defaults_follow_their_papers(self):
    rloo, rpp, grpo = (config_lib.get_config(s)[s] for s in ("rloo", "reinforce_pp", "grpo"))
    self.assertEqual((grpo.kl_loss_coef, grpo.kl_coef, grpo.num_generations), (0.04, 0.0, 4))
    self.assertEqual((rloo.kl_loss_coef, rloo.kl_coef, rloo.advantage_estimator),
                     (0.0, 0.05, "rloo"))
    self.assertEqual((rpp.num_generations, rpp.kl_coef, rpp.advantage_estimator),
                     (1, 0.05, "reinforce_pp"))
    self.assertNotIn("optim", config_lib.get_config("best_of_n").best_of_n)  # trains nothing

  def test_batches_must_split_over_the_mesh(self):
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, num_devices=8))  # 8 batch shards
    cfg = config_lib.ppo_config("test")
    validate.check_mesh(cfg, mesh)  # batch 16, minibatch 8: fine
    cfg.rm.data.generation_batch_size = 12
    with self.assertRaisesRegex(ValueError, r"rm.data.generation_batch_size is 12, which does "
                                r"not split over the 8 batch shards"):
      validate.check_mesh(cfg, mesh)
    cfg.rm.data.generation_batch_size = 32
    cfg.ppo.num_minibatches = 4  # minibatches of 4 rows on 8 shards
    with self.assertRaisesRegex(ValueError, "ppo minibatch"):
      validate.check_mesh(cfg, mesh)
    with self.assertRaisesRegex(ValueError, "ppo minibatch"):  # before anything runs
      pipeline.run(cfg, None, mesh)

  def test_sampling_filters_are_fine_outside_rl(self):
    cfg = config_lib.rm_config("test")
    cfg.sampling.update(top_k=5, top_p=0.9, min_new_tokens=2)
    validate.check(cfg)

  def test_every_preset_is_valid(self):
    for stage in config_lib.STAGES:
      for preset in config_lib.PRESETS + scale.NAMES:
        validate.check(config_lib.get_config(stage, preset))

  def test_ppo_error_comes_before_sft_trains(self):
    """A capacity-routed MoE policy cannot do PPO: refused before SFT writes anything."""
    cfg = config_lib.ppo_config("test")
    cfg.model.moe.update(num_experts=2, dropless=False)
    with tempfile.TemporaryDirectory() as wd:
      with self.assertRaisesRegex(ValueError, "model.moe.dropless=True"):
        pipeline.run(cfg, wd)
      self.assertEqual(os.listdir(wd), [])
    sft_cfg = config_lib.sft_config("test")  # SFT alone may use capacity routing
    sft_cfg.model.moe.update(num_experts=2, dropless=False)
    validate.check(sft_cfg)

  def test_ppo_error_from_a_given_sft_checkpoint(self):
    workdir, _ = testing.shared_pipeline()
    with tempfile.TemporaryDirectory() as wd:
      sft_dir = os.path.join(wd, "sft")
      os.makedirs(sft_dir)
      cfg_json = os.path.join(workdir, "sft", "model_config.json")
      with open(cfg_json) as f:
        model = json.load(f)
      model["moe"].update(num_experts=2, dropless=False)
      for name, value in (("model_config.json", model),
                          ("tokenizer.json", {"kind": "byte"})):
        with open(os.path.join(sft_dir, name), "w") as f:
          json.dump(value, f)
      cfg = config_lib.ppo_config("test")
      cfg.sft_checkpoint = sft_dir
      with self.assertRaisesRegex(ValueError, f"the policy in {sft_dir}: model.moe.dropless"):
        pipeline.run(cfg, None)
      cfg.sft_checkpoint = os.path.join(wd, "nothing")
      with self.assertRaisesRegex(FileNotFoundError, "sft_checkpoint=.*: no model_config.json"):
        pipeline.run(cfg, None)

  def test_moe_preset_is_dropless_everywhere(self):
    for stage in config_lib.STAGES:
      moe = config_lib.get_config(stage, "moe").model.moe
      self.assertEqual((moe.num_experts, moe.dropless), (4, True))
    self.assertEqual(config_lib.sft_config("").model.moe.num_experts, 0)

  def test_entry_points_hold_their_stages(self):
    self.assertNotIn("rm", config_lib.sft_config())
    self.assertNotIn("ppo", config_lib.rm_config())
    cfg = config_lib.ppo_config()
    self.assertEqual(config_lib.stages_of(cfg), ("sft", "rm", "ppo"))
    with self.assertRaisesRegex(ValueError, "unknown preset 'big' for configs/rm.py"):
      config_lib.rm_config("big")
    np.testing.assert_equal(cfg.sft.optim.to_dict().keys(), cfg.ppo.optim.to_dict().keys())


if __name__ == "__main__":
  absltest.main()
