"""The DPO stage: sequence log-probs against a numpy log-softmax, the first step's loss at
log 2, end to end from the shared pipeline's SFT policy and preference pairs (reference
log-probs stored once, TRL metrics, held-out summary), exact resume, sharded == one device,
and training without an RM."""

import os
import shutil
import tempfile

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np
from flax import nnx

import testing
from rlhf_jax import pipeline
from rlhf_jax.models import PolicyModel, TransformerConfig
from rlhf_jax.stages import dpo

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")


def _config(workdir, num_devices=1, **dpo_keys):
  """The DPO test preset from the shared pipeline's SFT policy, trained on its generated
  pairs (copied into `workdir/rm`, where the pipeline finds and reuses them)."""
  cfg = testing.from_shared(testing.pipeline_config("dpo", num_devices))
  shared, _ = testing.shared_pipeline()
  os.makedirs(os.path.join(workdir, "rm"), exist_ok=True)
  for split in ("train", "eval"):
    for ext in ("jsonl", "settings.json"):
      name = f"preferences_{split}.{ext}"
      shutil.copy(os.path.join(shared, "rm", name), os.path.join(workdir, "rm", name))
  cfg.dpo.update(**dpo_keys)
  if cfg.dpo.reward == "none":
    cfg.rm_checkpoint = ""
  return cfg


def _rows(workdir):
  return [r for r in testing.metric_rows(workdir, "dpo") if "loss" in r]


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class PairLogpsTest(absltest.TestCase):

  def test_matches_numpy_log_softmax_of_the_full_forward(self):
    cfg = TransformerConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, mlp_dim=64)
    graphdef, state, _ = testing.random_state(lambda: PolicyModel(cfg, nnx.Rngs(0)), seed=3)
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(0)
    p, c, b = 5, 4, 3
    batch = {}
    for key, lengths in (("chosen", (4, 1, 2)), ("rejected", (2, 3, 4))):
      prompt = testing.left_padded_batch(rng, (3, 5, 2), p, 37)
      tokens = np.concatenate([prompt[0], rng.integers(0, 37, (b, c))], 1).astype(np.int32)
      resp_mask = (np.arange(c)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
      batch[f"{key}_tokens"] = tokens
      batch[f"{key}_mask"] = np.concatenate([prompt[1], resp_mask], 1)
    # Jitted: eager NNX dispatches op by op (seconds for this tiny network).
    chosen, rejected = nnx.jit(dpo.pair_logps, static_argnums=2)(
        model, {k: jnp.asarray(v) for k, v in batch.items()}, p)
    forward = nnx.jit(lambda m, t, k: m(t, k)[0])
    for key, got in (("chosen", chosen), ("rejected", rejected)):
      tokens, mask = batch[f"{key}_tokens"], batch[f"{key}_mask"]
      logits = forward(model, jnp.asarray(tokens), jnp.asarray(mask))
      logp = _np_log_softmax(np.asarray(logits, np.float64))
      want = [sum(logp[i, t - 1, tokens[i, t]] for t in range(p, p + c) if mask[i, t])
              for i in range(b)]
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=key)


class DpoStageTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.workdir = cls._tmp.name
    cls.out = pipeline.run(_config(cls.workdir), cls.workdir)
    cls.rows = _rows(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_trains_and_reports(self):
    m = self.out.metrics
    # Step 1, every 4th (log_every) and the evals (eval_every 6).
    self.assertEqual([r["step"] for r in self.rows], [1, 4, 6, 8, 12])
    self.assertAlmostEqual(self.rows[0]["loss"], np.log(2.0), places=5)  # pi = ref: h = 0
    for key in KEYS + ("eval_rewards/accuracies", "eval_loss", "final/sft_gold_reward",
                       "final/dpo_gold_reward", "final/sft_rm_score", "final/dpo_rm_score",
                       "final/kl", "final/sft_preference_accuracy",
                       "final/dpo_preference_accuracy", "rm/eval_accuracy"):
      self.assertTrue(np.isfinite(m[key]), key)
    # The implicit reward ranks most held-out pairs right after 12 steps (measured 0.73).
    self.assertGreater(m["eval_rewards/accuracies"], 0.6)
    self.assertLess(m["eval_loss"], np.log(2.0))  # below the loss at the start
    self.assertGreater(m["final/kl"], 0.0)
    for split in ("train", "eval"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, "dpo",
                                                  f"{split}_{dpo.REFERENCE_FILE}")))
    self.assertEqual(self.out.stages["dpo"].compiled, {"train_step": 1})

  def test_resume_is_exact_and_needs_no_rm(self):
    """Interrupted at step 6 and resumed to 12, without an RM: the same metrics as the
    uninterrupted run, and no RM trained or scored."""
    with tempfile.TemporaryDirectory() as wd:
      cfg = _config(wd, reward="none")
      cfg.dpo.train.num_steps = 6
      pipeline.run(cfg, wd)
      resumed = pipeline.run(_config(wd, reward="none"), wd).metrics
      self.assertFalse(os.path.exists(os.path.join(wd, "rm", "summary.json")))
    for key in KEYS + ("eval_rewards/accuracies", "final/dpo_gold_reward"):
      self.assertEqual(resumed[key], self.out.metrics[key], key)
    self.assertNotIn("final/dpo_rm_score", resumed)

  def test_sharded_matches_one_device(self):
    """Four steps on 8 fake devices (data 2 x fsdp 4) equal the one-device run's."""
    with tempfile.TemporaryDirectory() as wd:
      cfg = _config(wd, num_devices=8, reward="none")
      cfg.mesh.update(data=2, fsdp=4)
      cfg.dpo.train.num_steps = 4
      pipeline.run(cfg, wd)
      rows = _rows(wd)
    for key in KEYS:  # step 4
      np.testing.assert_allclose(rows[1][key], self.rows[1][key], rtol=1e-3, atol=1e-4,
                                 err_msg=key)

  def test_changed_pairs_are_refused(self):
    arrays = {"chosen_mask": np.zeros((3, 4))}
    with self.assertRaisesRegex(ValueError, "reference log-probs of .* pairs but there are 3"):
      dpo.reference_logps(self.workdir, "train", arrays, None, 4, None)


if __name__ == "__main__":
  absltest.main()
