"""The PPO stage end to end on the synthetic task (the shared pipeline of tests/testing.py):
invariants of an iteration, no recompilation, sharded == unsharded, resume, the pipeline's
reuse of finished stages; PPO's loss and experience pass against references."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import testing
from rlhf_jax import artifacts, pipeline, sharding
from rlhf_jax.models import ActorCritic, MoEConfig, PolicyModel, ScalarHead, TransformerConfig, ValueModel, moe
from rlhf_jax.rl import core, losses, ppo_fn
from rlhf_jax.stages import ppo

PROGRAMS = {"sampler": 1, "score": 1, "experience": 1, "train_step": 1}


def _config(num_devices=1, **ppo_overrides):
  cfg = testing.pipeline_config("ppo", num_devices)
  cfg.ppo.update(ppo_overrides)
  return cfg


class PpoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir, cls.pipeline = testing.shared_pipeline()  # SFT -> preferences -> RM -> PPO
    cls.result = cls.pipeline.stages["ppo"]
    cls.rows = testing.metric_rows(cls.workdir)

  def _ppo_rows(self):
    return [r for r in self.rows if r["stage"] == "ppo" and "objective/kl" in r]

  def test_every_stage_ran_and_wrote_its_files(self):
    for path in ("sft/model_config.json", "sft/summary.json", "rm/normalization.json",
                 "rm/summary.json", "rm/preferences_train.jsonl", "ppo/summary.json"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, path)), path)
    self.assertEqual({r["stage"] for r in self.rows}, {"sft", "rm", "ppo"})
    m = self.result.metrics
    self.assertIs(self.pipeline.metrics, m)  # the pipeline reports its last stage
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
    self.assertNotEqual(rows[-1]["objective/kl"], 0.0)  # the policy did move
    # The adaptive controller moved beta: e = clip(KL / target - 1, +-0.2), beta *= 1 + e n / H.
    beta = 0.05
    for r in rows:
      self.assertAlmostEqual(r["kl_coef"], beta, places=6)
      beta = core.adaptive_kl_coef(beta, r["objective/kl"], 0.01, 100, 16)
    self.assertNotAlmostEqual(rows[-1]["kl_coef"], 0.05, places=4)

  def test_reward_critic_starts_calibrated(self):
    """critic="reward": the critic is the RM with its normalisation folded into the head, so
    before any update its value at a sequence's last real token is the normalised score that
    PPO trains on, `reward.score = gain * raw + bias`."""
    cfg = _config()
    self.assertEqual(cfg.ppo.critic, "reward")
    policy, reward = self.pipeline.policy, self.pipeline.reward
    mesh = sharding.make_mesh(cfg.mesh)
    ac_graphdef, state, _, _ = ppo.init_actor_critic(cfg, policy.model_config, policy.params,
                                                     reward, mesh)
    # The rollout layout: left-padded prompts, then responses with pads after their EOS.
    rng = np.random.default_rng(0)
    p, n = cfg.data.max_prompt_len, cfg.data.max_completion_len
    vocab = reward.model_config.vocab_size
    prompt, prompt_mask = testing.left_padded_batch(rng, [p, 3, 7, 1], p, vocab)
    resp, resp_mask = testing.left_padded_batch(rng, [n, 1, 4, 9], n, vocab)
    resp_mask = resp_mask[:, ::-1]  # response tokens first, pads after
    seq = np.concatenate([prompt, resp], 1)
    seq_mask = np.ascontiguousarray(np.concatenate([prompt_mask, resp_mask], 1))
    with sharding.use_mesh(mesh):
      values, score, raw = jax.jit(lambda ac, rm, t, m: (
          nnx.merge(ac_graphdef, ac).critic(t, m), reward.score(rm, t, m),
          artifacts.eval_model(reward.graphdef, rm)(t, m)))(state.params, reward.params, seq,
                                                              seq_mask)
    last = np.array([np.flatnonzero(row)[-1] for row in seq_mask])
    np.testing.assert_allclose(np.asarray(values)[np.arange(len(seq)), last], np.asarray(score),
                               rtol=1e-5, atol=1e-5)
    self.assertGreater(np.abs(np.asarray(score) - np.asarray(raw)).max(), 1e-2)  # not vacuous

  def test_periodic_held_out_eval(self):
    """eval/* every 3 iterations; the last equals the summary (same prompts, key, sampler)."""
    rows = [r for r in self._ppo_rows() if "eval/kl" in r]
    self.assertEqual([r["step"] for r in rows], [3, 6])
    m = self.result.metrics
    for key in ("gold_reward", "rm_score"):
      self.assertEqual(rows[-1][f"eval/{key}"], m[f"final/ppo_{key}"], key)
    self.assertGreater(rows[-1]["eval/kl"], 0.0)

  def test_no_recompilation_after_first_iteration(self):
    self.assertEqual(self.result.compiled, PROGRAMS)

  def test_sharded_iteration_matches_unsharded(self):
    """Two PPO iterations on 8 fake devices (data 2 x fsdp 4) vs one device, both from the
    same SFT and RM checkpoints. (The byte vocab, 259, cannot split over `tensor`; tensor
    parallelism is compared with one device in sharding_test.)"""
    outs = []
    for mesh in (dict(num_devices=1), dict(data=2, fsdp=4, num_devices=8)):
      cfg = testing.from_shared(_config(num_iterations=2))
      cfg.mesh.update(mesh)
      with tempfile.TemporaryDirectory() as wd:
        outs.append(pipeline.run(cfg, wd).metrics)
    for key in ("objective/kl", "objective/scores", "loss/policy", "loss/value",
                "policy/approxkl", "gold/reward", "final/ppo_rm_score"):
      np.testing.assert_allclose(outs[1][key], outs[0][key], rtol=1e-3, atol=1e-4, err_msg=key)

  def test_rerun_reuses_finished_stages(self):
    """A rerun of the finished pipeline runs nothing and reports the saved final metrics,
    iteration metrics included; metrics.jsonl gains no row."""
    prefs = os.path.join(self.workdir, "rm", "preferences_train.jsonl")
    mtime = os.path.getmtime(prefs)
    rows = testing.metric_rows(self.workdir)
    again = pipeline.run(_config(), self.workdir)
    self.assertEqual(os.path.getmtime(prefs), mtime)
    self.assertEqual(again.stages, {})  # SFT, RM and PPO were all reused, none ran
    self.assertEqual(testing.metric_rows(self.workdir), rows)
    self.assertEqual(again.metrics, self.result.metrics)
    self.assertTrue(np.isfinite(again.metrics["final/kl"]))

  def test_gold_reward_ppo_raises_gold_reward(self):
    """PPO against the sort task's exact reward (no RM) with a value head on the policy trunk
    and 2 micro-batches per minibatch: gold reward on held-out prompts goes up."""
    cfg = testing.from_shared(_config(num_iterations=12, reward="gold", critic="shared",
                               adaptive_kl=False))
    cfg.ppo.optim.update(learning_rate=3e-4, grad_accum_steps=2)
    with tempfile.TemporaryDirectory() as wd:
      out = pipeline.run(cfg, wd)
      rows = testing.metric_rows(wd, "ppo")
    m = out.metrics
    self.assertIsNone(out.reward)  # no RM loaded or trained
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
    self.assertEqual(out.stages["ppo"].compiled,
                     {k: v for k, v in PROGRAMS.items() if k != "score"})

  def test_resume_mid_run_is_exact(self):
    """3 iterations, stop, resume to 6 == the shared pipeline's 6 uninterrupted iterations,
    the adaptive KL coefficient included (it is restored from the checkpoint)."""
    full = self.result.metrics
    with tempfile.TemporaryDirectory() as wd:
      pipeline.run(testing.from_shared(_config(num_iterations=3)), wd)
      resumed = pipeline.run(testing.from_shared(_config()), wd).metrics
    self.assertNotAlmostEqual(full["kl_coef"], 0.05, places=4)
    for key in ("objective/kl", "objective/scores", "loss/policy", "kl_coef",
                "final/ppo_gold_reward"):
      self.assertEqual(full[key], resumed[key], key)


class MoePpoTest(absltest.TestCase):

  def test_moe_policy_through_sft_and_ppo_on_an_expert_mesh(self):
    """Dropless MoE in every layer, data 4 x expert 2 on 8 fake devices, gold reward and a
    shared critic (no RM needed): the PPO invariants hold and the aux losses are reported."""
    cfg = _config(num_devices=8, num_iterations=3, reward="gold", critic="shared")
    cfg.mesh.update(data=4, expert=2)
    cfg.model.moe.update(num_experts=4, top_k=2, moe_every=1, dropless=True)
    cfg.sft.train.num_steps = 20
    with tempfile.TemporaryDirectory() as wd:
      out = pipeline.run(cfg, wd)
      rows = [r for r in testing.metric_rows(wd, "ppo") if "objective/kl" in r]
    self.assertEqual(set(out.stages), {"sft", "ppo"})  # gold reward: no RM stage
    # SFT's optimizer moments are not kept alive through PPO; its policy is.
    self.assertIsNone(out.stages["sft"].state)
    self.assertIs(out.stages["sft"].policy, out.policy)
    self.assertLen(rows, 3)
    for r in rows:
      self.assertAlmostEqual(r["policy/first_minibatch_ratio"], 1.0, places=6)
      self.assertLess(r["policy/sample_logprob_gap"], 1e-4)
      self.assertGreater(r["moe/aux_loss"], 0.0)
      self.assertEqual(r["moe/dropped_fraction"], 0.0)
    self.assertEqual(out.stages["ppo"].compiled,
                     {k: v for k, v in PROGRAMS.items() if k != "score"})


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class PpoLossTest(parameterized.TestCase):
  """`ppo_fn.loss` and the experience pass run the LM head on the response positions only and
  take log-probs as logit - logsumexp; checked against the whole-sequence logits of
  `ActorCritic.__call__`, a float64 numpy log-softmax, and the gradient of a loss written
  the straightforward way (full log_softmax, entropy always differentiated)."""

  def _setup(self, critic: str, use_moe: bool, seed: int = 0):
    cfg = TransformerConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
        init_std=0.3, rope_theta=500.0, tie_embeddings=False,
        moe=MoEConfig(num_experts=4, dropless=True) if use_moe else MoEConfig())
    rngs = nnx.Rngs(params=seed)
    if critic == "separate":
      ac = ActorCritic(PolicyModel(cfg, rngs), critic=ValueModel(cfg, rngs))
      head = ac.critic.value_head
    else:
      ac = ActorCritic(PolicyModel(cfg, rngs), value_head=ScalarHead(cfg, 0.0, rngs))
      head = ac.value_head
    head.w_Dx1.set_value(jax.random.normal(jax.random.key(seed + 1), head.w_Dx1.shape))
    graphdef, params = nnx.split(ac)
    rng = np.random.default_rng(seed)
    b, p, n = 4, 5, 6
    seq = rng.integers(3, cfg.vocab_size, (b, p + n)).astype(np.int32)
    seq_mask = np.ones_like(seq)
    seq_mask[0, :2] = 0  # left-padded prompt
    resp_mask = np.ones((b, n), np.int32)
    resp_mask[1, 3:] = 0  # stopped early: pads after EOS
    seq_mask[:, p:] = resp_mask
    batch = {"seq": seq, "seq_mask": seq_mask, "response": seq[:, p:], "mask": resp_mask,
             "old_logp": rng.normal(-3.0, 0.3, (b, n)).astype(np.float32),
             "old_values": rng.normal(0.0, 0.5, (b, n)).astype(np.float32),
             "advantages": rng.normal(0.0, 1.0, (b, n)).astype(np.float32),
             "returns": rng.normal(0.0, 1.0, (b, n)).astype(np.float32)}
    return cfg, graphdef, params, jax.tree.map(jnp.asarray, batch)

  @parameterized.named_parameters(
      ("separate_critic", "separate", False, 0.0),
      ("shared_value_head", "shared", False, 0.0),
      ("shared_with_entropy_bonus", "shared", False, 0.05),
      ("moe_separate_critic_entropy_bonus", "separate", True, 0.05),
  )
  def test_loss_and_gradient_match_full_logits_reference(self, critic, use_moe, entropy_coef):
    _, graphdef, params, batch = self._setup(critic, use_moe)
    temperature, n = 0.7, batch["response"].shape[1]
    hp = core.RLParams(clip_ratio=0.2, value_clip=0.2, vf_coef=0.1, entropy_coef=entropy_coef,
                       temperature=temperature)

    def loss(params, fn):
      return fn(nnx.merge(graphdef, params), batch, hp)

    def reference(model, batch, hp):
      clip, value_clip, vf_coef = hp.clip_ratio, hp.value_clip, hp.vf_coef
      all_logits, all_values = model(batch["seq"], batch["seq_mask"])  # every position
      logits = all_logits[:, -n - 1:-1] / temperature
      logp_all = jax.nn.log_softmax(logits, axis=-1)
      logp = jnp.take_along_axis(logp_all, batch["response"][..., None], -1)[..., 0]
      logp = logp * batch["mask"]
      pg, _ = losses.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                                   clip)
      vf, _ = losses.value_loss(all_values[:, -n - 1:-1], batch["old_values"],
                                  batch["returns"], batch["mask"], value_clip)
      ent = core.masked_mean(-(jnp.exp(logp_all) * logp_all).sum(-1), batch["mask"])
      aux, _ = moe.aux_loss(model)
      return pg + vf_coef * vf - entropy_coef * ent + aux, {"logp": logp, "entropy": ent}

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (got, m), g_got = grad(params, ppo_fn.loss)
    (want, ref_m), g_want = grad(params, reference)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    self.assertAlmostEqual(float(m["policy/entropy"]), float(ref_m["entropy"]), places=5)
    self.assertEqual("moe/aux_loss" in m, use_moe)  # MoE auxiliary losses still collected
    if use_moe:
      self.assertGreater(float(m["moe/aux_loss"]), 0.0)
    flat_got = jax.tree.leaves(g_got)
    for a, b in zip(flat_got, jax.tree.leaves(g_want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    self.assertGreater(max(float(jnp.abs(a).max()) for a in flat_got), 1e-3)  # not vacuous

    # The log-probs themselves against float64 numpy on the full forward's logits.
    all_logits, _ = jax.jit(lambda p: nnx.merge(graphdef, p)(batch["seq"], batch["seq_mask"]))(
        params)
    logp64 = _np_log_softmax(np.asarray(all_logits)[:, -n - 1:-1] / temperature)
    want_logp = np.take_along_axis(logp64, np.asarray(batch["response"])[..., None], -1)[..., 0]
    ac = nnx.merge(graphdef, params)
    logits, values = ac.on_response(batch["seq"], batch["seq_mask"], n)
    got_logp = core.token_logprobs(logits, batch["response"], temperature)
    np.testing.assert_allclose(np.asarray(got_logp), want_logp, rtol=0, atol=1e-5)
    _, all_values = ac(batch["seq"], batch["seq_mask"])
    # float32: the value head sums terms of magnitude ~8 (ulp ~1e-6), which the response-only
    # path adds in another order; measured differences reach 1.9e-6 on some CPUs' kernels.
    np.testing.assert_allclose(np.asarray(values), np.asarray(all_values)[:, -n - 1:-1],
                               rtol=0, atol=5e-6)

  @parameterized.named_parameters(("separate_critic", "separate"), ("shared", "shared"))
  def test_experience_old_logprobs_give_ratio_one(self, critic):
    """The experience pass and the loss share one forward: at the old parameters the ratio
    is exactly 1 and the values are the old values."""
    cfg, graphdef, params, batch = self._setup(critic, use_moe=False, seed=3)
    hp = core.RLParams(temperature=0.7)
    policy_graphdef, ref_params = nnx.split(PolicyModel(cfg, nnx.Rngs(params=9)))
    experience = jax.jit(lambda p, r, b, s, beta: ppo_fn.experience(
        graphdef, policy_graphdef, p, r, b, s, beta, hp, eos_id=2))
    inputs = {k: batch[k] for k in ("seq", "seq_mask", "response", "mask")}
    scores = jnp.asarray([0.5, -1.0, 0.2, 0.0])
    exp, metrics = experience(params, ref_params, inputs, scores, jnp.float32(0.1))
    self.assertGreater(abs(float(metrics["objective/kl"])), 1e-2)  # a different reference
    self.assertAlmostEqual(float(metrics["objective/scores"]), float(scores.mean()), places=6)
    loss = lambda model, b: ppo_fn.loss(model, b, hp)
    # One row less than the experience batch, as a minibatch would be.
    mb = {k: v[1:] for k, v in exp.items()}
    _, m = jax.jit(lambda p, b: loss(nnx.merge(graphdef, p), b))(params, mb)
    self.assertAlmostEqual(float(m["val/ratio"]), 1.0, places=6)
    self.assertLess(float(m["policy/approxkl"]), 1e-12)


if __name__ == "__main__":
  absltest.main()
