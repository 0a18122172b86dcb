"""The PPO stage end to end on the synthetic task: invariants of an iteration, no
recompilation, sharded == unsharded, resume, and the pipeline's reuse of finished stages."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import ppo


def _config(num_devices=1, **ppo_overrides):
  cfg = config_lib.ppo_config("test")
  for c in (cfg.mesh, cfg.rm.mesh, cfg.rm.sft.mesh):
    c.num_devices = num_devices
  cfg.ppo.update(ppo_overrides)
  return cfg


class PpoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.result = ppo.run(_config(), cls.workdir)  # SFT -> preferences -> RM -> PPO
    with open(os.path.join(cls.workdir, "metrics.jsonl")) as f:
      cls.rows = [json.loads(line) for line in f]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.workdir, ignore_errors=True)
    super().tearDownClass()

  def _ppo_rows(self):
    return [r for r in self.rows if r["stage"] == "ppo" and "objective/kl" in r]

  def test_every_stage_ran_and_wrote_its_files(self):
    for path in ("sft/model_config.json", "rm/normalization.json", "rm/summary.json",
                 "rm/preferences_train.jsonl", "ppo/summary.json"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, path)), path)
    self.assertEqual({r["stage"] for r in self.rows}, {"sft", "rm", "ppo"})
    m = self.result["metrics"]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "policy/approxkl", "policy/clipfrac",
                "policy/entropy", "loss/policy", "loss/value", "val/clipfrac", "val/ratio",
                "val/num_eos_tokens", "kl_coef", "gold/reward", "final/sft_gold_reward",
                "final/ppo_gold_reward", "final/kl", "rm/eval_accuracy"):
      self.assertIn(key, m)
      self.assertTrue(np.isfinite(m[key]), key)

  def test_iteration_invariants(self):
    rows = self._ppo_rows()
    self.assertLen(rows, 6)
    first = rows[0]
    # Before any update the policy is the reference: KL is exactly 0 ...
    self.assertEqual(first["objective/kl"], 0.0)
    self.assertEqual(first["objective/non_score_reward"], 0.0)
    for r in rows:
      # ... and in every iteration the first minibatch of the first epoch has ratio exactly 1,
      self.assertAlmostEqual(r["policy/first_minibatch_ratio"], 1.0, places=6)
      # the log-probs recorded while sampling equal the training forward's,
      self.assertLess(r["policy/sample_logprob_gap"], 1e-4)
      # and rlhf_reward = scores + non_score_reward.
      self.assertAlmostEqual(r["objective/rlhf_reward"],
                             r["objective/scores"] + r["objective/non_score_reward"], places=4)
    self.assertGreater(rows[-1]["objective/kl"], 0.0)  # the policy did move

  def test_no_recompilation_after_first_iteration(self):
    self.assertEqual(self.result["compiled"], {"sampler": 1, "experience": 1, "train_step": 1})

  def test_sharded_iteration_matches_unsharded(self):
    """Two PPO iterations on 8 fake devices (data 2 x fsdp 4) vs one device, both from the
    same SFT and RM checkpoints. (The byte vocab, 259, cannot split over `tensor`; tensor
    parallelism is compared with one device in sharding_test.)"""
    outs = []
    for mesh in (dict(num_devices=1), dict(data=2, fsdp=4, num_devices=8)):
      cfg = _config(num_iterations=2)
      cfg.mesh.update(mesh)
      cfg.sft_checkpoint = os.path.join(self.workdir, "sft")
      cfg.rm_checkpoint = os.path.join(self.workdir, "rm")
      with tempfile.TemporaryDirectory() as wd:
        outs.append(ppo.run(cfg, wd)["metrics"])
    for key in ("objective/kl", "objective/scores", "loss/policy", "loss/value",
                "policy/approxkl", "gold/reward", "final/ppo_rm_score"):
      np.testing.assert_allclose(outs[1][key], outs[0][key], rtol=1e-3, atol=1e-4, err_msg=key)

  def test_rerun_reuses_finished_stages(self):
    prefs = os.path.join(self.workdir, "rm", "preferences_train.jsonl")
    mtime = os.path.getmtime(prefs)
    again = ppo.run(_config(), self.workdir)
    self.assertEqual(os.path.getmtime(prefs), mtime)
    self.assertEqual(int(again["state"].step), int(self.result["state"].step))
    for key in ("final/sft_gold_reward", "final/ppo_gold_reward", "final/ppo_rm_score"):
      self.assertAlmostEqual(again["metrics"][key], self.result["metrics"][key], places=5)

  def test_gold_reward_ppo_raises_gold_reward(self):
    """PPO against the sort task's exact reward (no RM) with a value head on the policy trunk
    and 2 micro-batches per minibatch: gold reward on held-out prompts goes up."""
    cfg = _config(num_iterations=12, reward="gold", critic="shared")
    cfg.optim.update(learning_rate=3e-4, grad_accum_steps=2)
    cfg.sft_checkpoint = os.path.join(self.workdir, "sft")
    with tempfile.TemporaryDirectory() as wd:
      out = ppo.run(cfg, wd)
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    m = out["metrics"]
    self.assertNotIn("final/ppo_rm_score", m)
    self.assertGreater(m["final/ppo_gold_reward"], m["final/sft_gold_reward"] + 0.15)
    gold = [r["gold/reward"] for r in rows if "gold/reward" in r and "objective/kl" in r]
    self.assertLen(gold, 12)
    self.assertGreater(np.mean(gold[-3:]), np.mean(gold[:3]) + 0.1)
    # The score is the gold reward itself, and the accumulated step keeps ratio 1 at the start.
    self.assertAlmostEqual(rows[-2]["objective/scores"], rows[-2]["gold/reward"], places=5)
    for r in rows:
      if "policy/first_minibatch_ratio" in r:
        self.assertAlmostEqual(r["policy/first_minibatch_ratio"], 1.0, places=6)
    self.assertEqual(out["compiled"], {"sampler": 1, "experience": 1, "train_step": 1})

  def test_bad_reward_and_critic_settings(self):
    with self.assertRaisesRegex(ValueError, "ppo.critic=sft or shared"):
      ppo.run(_config(reward="gold"), None)
    with self.assertRaisesRegex(ValueError, "choose 'reward', 'sft' or 'shared'"):
      ppo.run(_config(critic="value"), None)
    with self.assertRaisesRegex(ValueError, "choose 'model'"):
      ppo.run(_config(reward="vader"), None)

  def test_resume_mid_run_is_exact(self):
    cfg = _config(num_iterations=4)
    cfg.train.checkpoint_every = 2
    cfg.sft_checkpoint = os.path.join(self.workdir, "sft")
    cfg.rm_checkpoint = os.path.join(self.workdir, "rm")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
      full = ppo.run(cfg, a)["metrics"]
      cfg_half = _config(num_iterations=2)
      cfg_half.train.checkpoint_every = 2
      cfg_half.sft_checkpoint, cfg_half.rm_checkpoint = cfg.sft_checkpoint, cfg.rm_checkpoint
      ppo.run(cfg_half, b)
      resumed = ppo.run(cfg, b)["metrics"]
    for key in ("objective/kl", "objective/scores", "loss/policy", "kl_coef",
                "final/ppo_gold_reward"):
      self.assertEqual(full[key], resumed[key], key)


class MoePpoTest(absltest.TestCase):

  def test_moe_policy_through_sft_and_ppo_on_an_expert_mesh(self):
    """Dropless MoE in every layer, data 4 x expert 2 on 8 fake devices, gold reward and a
    shared critic (no RM needed): the PPO invariants hold and the aux losses are reported."""
    cfg = _config(num_devices=8, num_iterations=3, reward="gold", critic="shared")
    for c in (cfg.mesh, cfg.rm.sft.mesh):
      c.update(data=4, expert=2)
    cfg.rm.sft.model.moe.update(num_experts=4, top_k=2, moe_every=1, dropless=True)
    cfg.rm.sft.train.num_steps = 20
    with tempfile.TemporaryDirectory() as wd:
      out = ppo.run(cfg, wd)
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"ppo"' in line]
    rows = [r for r in rows if "objective/kl" in r]
    self.assertLen(rows, 3)
    for r in rows:
      self.assertAlmostEqual(r["policy/first_minibatch_ratio"], 1.0, places=6)
      self.assertLess(r["policy/sample_logprob_gap"], 1e-4)
      self.assertGreater(r["moe/aux_loss"], 0.0)
      self.assertEqual(r["moe/dropped_fraction"], 0.0)
    self.assertEqual(out["compiled"], {"sampler": 1, "experience": 1, "train_step": 1})

  def test_capacity_routed_moe_policy_is_rejected(self):
    cfg = _config(reward="gold", critic="shared")
    cfg.rm.sft.model.moe.update(num_experts=2, dropless=False)
    cfg.rm.sft.train.num_steps = 2
    with tempfile.TemporaryDirectory() as wd:
      with self.assertRaisesRegex(ValueError, "dropless=True"):
        ppo.run(cfg, wd)


if __name__ == "__main__":
  absltest.main()
