"""Reward model: Bradley-Terry loss against numpy, pad invariance of the score, the
normalisation, the simulated annotator, bad preference data, and the stage end to end."""

import functools
import json
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import testing
from rlhf_jax import artifacts, pipeline, sampling, sharding
from rlhf_jax.stages import preferences, rm
from rlhf_jax.data import batching, sources, tasks
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import RewardModel, TransformerConfig


@functools.lru_cache(maxsize=None)
def _tiny_reward_model():
  """A 2-layer RewardModel with numpy-drawn weights (no per-shape JAX RNG compiles)."""
  cfg = TransformerConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, num_layers=2,
                          num_heads=4, num_kv_heads=2, mlp_dim=64)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # RMSNorm gains
      return jnp.ones(x.shape, x.dtype)
    std = 1.0 if "reward_head" in name else 0.2  # a large head: scores differ visibly
    return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


# Compiled once per shape and shared by the tests.
_score = jax.jit(lambda model, tokens, mask: model(tokens, mask))
_pair_scores = jax.jit(rm.pair_scores)
_rm_loss = jax.jit(rm.rm_loss, static_argnums=2)
_per_token = jax.jit(lambda model, tokens, mask: model.per_token(tokens, mask))


def _pairs(n, seed=0):
  """Preference pairs on sort prompts: the sorted answer vs a shuffled, shorter one."""
  rng = np.random.default_rng(seed)
  out = []
  for rec in tasks.SortTask().sft_records(n, seed):
    digits = rec["completion"].split()
    wrong = list(rng.permutation(digits))[:max(1, len(digits) - int(rng.integers(0, 3)))]
    out.append({"prompt": rec["prompt"], "chosen": rec["completion"],
                "rejected": " " + " ".join(wrong) + " x"})
  return out


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


class RmUnitTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("plain", False, 0.0),
      ("margins", True, 0.0),
      ("centering", False, 0.3),
      ("margins_and_centering", True, 0.3),
  )
  def test_loss_matches_numpy(self, with_margin, centering_coef):
    model = _tiny_reward_model()
    recs = _pairs(8, seed=1)
    margins = np.array([0.0, 0.5, -1.0, 2.0, 0.25, -0.375, 1.5, 0.0])
    if with_margin:
      recs = [dict(r, margin=float(m)) for r, m in zip(recs, margins)]
    batch = batching.preference_arrays(recs, ByteTokenizer(), 20, 16)
    np.testing.assert_array_equal(batch["margin"], margins if with_margin else 0.0)

    loss, metrics = _rm_loss(model, batch, centering_coef)

    # Scores from two separate forwards (not the concatenated one rm_loss uses).
    r_c = np.asarray(_score(model, batch["chosen_tokens"], batch["chosen_mask"]), np.float64)
    r_r = np.asarray(_score(model, batch["rejected_tokens"], batch["rejected_mask"]), np.float64)
    self.assertGreater(np.std(r_c - r_r), 1e-2)  # the check below is not vacuous
    m = margins if with_margin else np.zeros(8)
    x = r_c - r_r - m
    want = np.mean(np.log1p(np.exp(-x))) + centering_coef * np.mean((r_c + r_r) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(r_c - r_r > 0))
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(r_c - r_r), rtol=1e-5,
                               atol=1e-6)
    both = np.concatenate([r_c, r_r])
    np.testing.assert_allclose(float(metrics["reward_mean"]), both.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_std"]), both.std(), rtol=1e-4, atol=1e-6)

    pair_c, pair_r = _pair_scores(model, batch)
    np.testing.assert_allclose(np.asarray(pair_c), r_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pair_r), r_r, rtol=1e-5, atol=1e-5)

  def test_score_is_invariant_to_padding(self):
    model = _tiny_reward_model()
    recs = _pairs(8, seed=2)  # prompts up to 18 bytes, responses up to 14 bytes + EOS
    tok = ByteTokenizer()
    scores = {}
    for p, c in ((20, 16), (31, 16), (20, 27)):
      counts = batching.PreferenceCounts()
      batch = batching.preference_arrays(recs, tok, p, c, counts)
      self.assertEqual((counts.kept, counts.truncated), (8, 0))
      self.assertEqual(batch["chosen_tokens"].shape, (8, p + c))
      scores[(p, c)] = [np.asarray(s) for s in _pair_scores(model, batch)]
    ref_c, ref_r = scores[(20, 16)]
    self.assertGreater(np.abs(ref_c - ref_r).max(), 1e-2)  # scores do depend on the text
    for key, (s_c, s_r) in scores.items():
      np.testing.assert_allclose(s_c, ref_c, atol=2e-5, err_msg=str(key))
      np.testing.assert_allclose(s_r, ref_r, atol=2e-5, err_msg=str(key))

    # The score is the per-token head at the last real token (the EOS), and the ids sitting
    # in pad slots do not matter.
    batch = batching.preference_arrays(recs, tok, 20, 16)
    tokens, mask = batch["chosen_tokens"], batch["chosen_mask"]
    last = np.array([np.flatnonzero(row)[-1] for row in mask])
    np.testing.assert_array_equal(tokens[np.arange(8), last], tok.eos_id)
    per_token = np.asarray(_per_token(model, tokens, mask))
    np.testing.assert_allclose(per_token[np.arange(8), last], ref_c, atol=2e-5)
    garbage = np.where(mask == 1, tokens,
                       np.random.default_rng(0).integers(3, tok.vocab_size, tokens.shape))
    np.testing.assert_allclose(np.asarray(_score(model, garbage.astype(np.int32), mask)), ref_c,
                               atol=2e-5)

  def test_normalization(self):
    rng = np.random.default_rng(0)
    for raw in (rng.normal(3.0, 0.2, 100), rng.uniform(-50, -40, 7).astype(np.float32),
                np.array([1.0, 2.0])):
      gain, bias = rm.normalization(raw)
      self.assertIsInstance(gain, float)
      z = gain * np.asarray(raw, np.float64) + bias
      self.assertAlmostEqual(z.mean(), 0.0, places=6)
      self.assertAlmostEqual(np.std(z), 1.0, places=6)
      self.assertGreater(gain, 0.0)  # preserves the order of scores
    with self.assertRaisesRegex(FloatingPointError, "std"):
      rm.normalization(np.full(16, 0.7))
    with self.assertRaises(FloatingPointError):
      rm.normalization(np.array([0.0, np.nan, 1.0]))

  @parameterized.parameters(0.1, 0.5, 2.0)
  def test_annotator_rate_matches_bradley_terry(self, temperature):
    n = 200_000
    diffs = np.array([-1.0, -0.2, 0.0, 0.05, 0.3, 1.0])
    gold_a = np.repeat(diffs + 0.4, n)  # offset: only the difference may matter
    gold_b = np.full(len(gold_a), 0.4)
    prefer_a = preferences.annotate(gold_a, gold_b, temperature, np.random.default_rng(7))
    self.assertEqual(prefer_a.dtype, bool)
    rates = prefer_a.reshape(len(diffs), n).mean(axis=1)
    p = _np_sigmoid(diffs / temperature)
    tol = 4 * np.sqrt(p * (1 - p) / n) + 1e-4
    np.testing.assert_array_less(np.abs(rates - p), tol)

  def test_annotator_without_noise_and_bad_temperature(self):
    gold_a = np.array([0.5, 0.1, 1.0, -2.0] * 1000)
    gold_b = np.array([0.4, 0.2, 1.0, -2.5] * 1000)
    prefer_a = preferences.annotate(gold_a, gold_b, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(prefer_a[gold_a > gold_b], True)
    np.testing.assert_array_equal(prefer_a[gold_a < gold_b], False)
    self.assertBetween(prefer_a[gold_a == gold_b].mean(), 0.4, 0.6)  # ties: a fair coin
    with self.assertRaisesRegex(ValueError, "temperature must be >= 0"):
      preferences.annotate(gold_a, gold_b, -0.1, np.random.default_rng(0))

  def test_bad_pairs(self):
    tok = ByteTokenizer()
    recs = [{"prompt": "sort 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},
            {"prompt": "sort 3 1 =", "chosen": " 1 3", "rejected": " 1 3"},
            {"prompt": "sort 5 4 =", "chosen": " 4 5", "rejected": " 5"}]
    counts = batching.PreferenceCounts()
    arr = batching.preference_arrays(recs, tok, 12, 8, counts, "drop", "mysrc")
    self.assertEqual((counts.kept, counts.identical, counts.truncated), (2, 1, 0))
    self.assertEqual(arr["chosen_tokens"].shape, (2, 20))
    self.assertEqual(arr["margin"].shape, (2,))
    self.assertEqual(tok.decode(arr["chosen_tokens"][1, 12:]), " 4 5")
    self.assertEqual(tok.decode(arr["rejected_tokens"][1, 12:]), " 5")
    with self.assertRaisesRegex(ValueError, "mysrc: record 2: chosen and rejected are identical"):
      batching.preference_arrays(recs, tok, 12, 8, None, "error", "mysrc")
    with self.assertRaisesRegex(ValueError, "bad_pairs is 'skip'"):
      batching.preference_arrays(recs, tok, 12, 8, None, "skip", "mysrc")

    # Responses of C - 1 tokens fit with their EOS; C tokens do not.
    c = 8
    fits = {"prompt": "p", "chosen": "a" * (c - 1), "rejected": "b"}
    too_long = {"prompt": "p", "chosen": "a", "rejected": "b" * c}
    counts = batching.PreferenceCounts()
    arr = batching.preference_arrays([fits, too_long], tok, 4, c, counts, "drop", "mysrc")
    self.assertEqual((counts.kept, counts.truncated, counts.identical), (2, 1, 0))
    self.assertEqual(arr["chosen_tokens"][0, -1], tok.eos_id)
    self.assertNotIn(tok.eos_id, arr["rejected_tokens"][1])  # kept, truncated, no EOS
    self.assertEqual(int(arr["rejected_mask"][1].sum()), 1 + c)
    batching.preference_arrays([fits], tok, 4, c, None, "error", "mysrc")  # no error
    with self.assertRaisesRegex(ValueError, r"mysrc: record 2: rejected is over "
                                r"data.max_completion_len \(8 tokens incl. EOS\)"):
      batching.preference_arrays([fits, too_long], tok, 4, c, None, "error", "mysrc")

  def test_no_eval_pairs_error_names_the_file_and_the_drops(self):
    tok = ByteTokenizer()
    recs = [{"prompt": "sort 2 1 =", "chosen": " 1 2", "rejected": " 1 2"}] * 3
    counts = batching.PreferenceCounts()
    arr = batching.preference_arrays(recs, tok, 12, 8, counts, "drop", "held.jsonl")
    with self.assertRaisesRegex(ValueError, r"^rm: no held-out preference pairs left after "
                                r"dropping bad pairs from held.jsonl: 3 of 3 pairs dropped as "
                                r"identical \(chosen == rejected\), 0 truncated, none kept; "
                                r"[^\n]*$"):
      rm._make_evaluator(None, arr, None, 4, None, "held.jsonl", counts)
    empty = batching.preference_arrays([], tok, 12, 8, None, "drop", "held.jsonl")
    with self.assertRaisesRegex(ValueError, "from held.jsonl: it holds no pairs;"):
      rm._make_evaluator(None, empty, None, 4, None, "held.jsonl", batching.PreferenceCounts())

  def test_bad_preference_file(self):
    with tempfile.TemporaryDirectory() as wd:
      path = os.path.join(wd, "prefs.jsonl")
      good = {"prompt": "sort 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}
      for bad, msg in ((dict(good, chosen=""), "prefs.jsonl:2: field 'chosen' is an empty"),
                       (dict(good, rejected=""), "prefs.jsonl:2: field 'rejected' is an empty"),
                       ({"prompt": "a", "chosen": "b"}, "prefs.jsonl:2: missing field 'rejected'"),
                       (dict(good, margin="big"),
                        "prefs.jsonl:2: field 'margin' must be a number")):
        with open(path, "w") as f:
          f.write(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with self.assertRaisesRegex(ValueError, msg):
          sources.read_jsonl(path, "preference")
      with open(path, "w") as f:
        f.write(json.dumps(dict(good, margin=1.5, id=3)) + "\n")
      self.assertEqual(sources.read_jsonl(path, "preference"), [dict(good, margin=1.5)])


class RmStageTest(absltest.TestCase):
  """The RM stage of the shared pipeline (tests/testing.py) on the sort task."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir, out = testing.shared_pipeline()
    cls.result = out.stages["rm"]
    cls.cfg = testing.pipeline_config("rm")
    cls.prefs_path = os.path.join(cls.workdir, "rm", "preferences_train.jsonl")

  def test_learns_held_out_preferences(self):
    m = self.result.metrics
    self.assertEqual(int(self.result.state.step), self.cfg.rm.train.num_steps)
    self.assertGreaterEqual(m["data/eval_kept"], 100)
    self.assertGreater(m["eval_gold_agreement"], 0.65)
    self.assertGreater(m["eval_accuracy"], 0.62)
    self.assertTrue(np.isfinite(m["eval_loss"]))
    self.assertLess(m["eval_loss"], np.log(2.0))

  def test_writes_preferences(self):
    recs = sources.read_jsonl(self.prefs_path, "preference")  # valid preference JSONL
    with open(self.prefs_path) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual(len(rows), self.result.metrics["data/train_kept"]
                     + self.result.metrics["data/train_identical"])
    self.assertLessEqual(len(rows), self.cfg.rm.data.num_train_prompts)
    self.assertGreater(len(rows), self.cfg.rm.data.num_train_prompts // 3)
    task = tasks.SortTask()
    for rec, row in list(zip(recs, rows))[:200]:
      self.assertAlmostEqual(row["gold_chosen"], task.gold_reward(rec["prompt"], rec["chosen"]))
      self.assertAlmostEqual(row["gold_rejected"],
                             task.gold_reward(rec["prompt"], rec["rejected"]))
    gold = np.array([(r["gold_chosen"], r["gold_rejected"]) for r in rows])
    self.assertFalse(np.any(gold[:, 0] == gold[:, 1]))  # drop_ties
    # Annotator temperature 0.1 and gold gaps >= 1/6: nearly every label follows the gold.
    self.assertGreater(np.mean(gold[:, 0] > gold[:, 1]), 0.85)
    self.assertLess(np.mean(gold[:, 0] > gold[:, 1]), 1.0)  # but it is noisy
    self.assertGreater(len({r["chosen"] for r in rows}), len(rows) // 4)  # varied samples

  def test_normalization_and_loaded_reward_model(self):
    cfg, d = self.cfg, self.cfg.data
    rm_dir = os.path.join(self.workdir, "rm")
    with open(os.path.join(rm_dir, "normalization.json")) as f:
      norm = json.load(f)
    self.assertEqual(norm["num_samples"], cfg.rm.normalize.num_samples)
    self.assertAlmostEqual(norm["gain"], 1.0 / norm["raw_std"], places=3)
    self.assertAlmostEqual(norm["bias"], -norm["raw_mean"] / norm["raw_std"], places=3)

    mesh = sharding.make_mesh(cfg.mesh)
    reward = artifacts.load_reward_model(rm_dir, mesh)
    self.assertIsInstance(reward, artifacts.RewardFunction)
    self.assertEqual((reward.gain, reward.bias), (norm["gain"], norm["bias"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reward.params),
                 jax.device_get(self.result.state.params))

    # The SFT samples the stage normalised on, drawn again as ids and scored in PPO's rollout
    # layout (no decode / re-encode): normalised scores have mean 0, std 1.
    policy = artifacts.load_policy(os.path.join(self.workdir, "sft"), mesh)
    prompts = [r["prompt"] for r in sources.read_jsonl(self.prefs_path, "preference")]
    prompts = prompts[:cfg.rm.normalize.num_samples]
    tok, bs = policy.tokenizer, cfg.rm.data.generation_batch_size
    sampler = sampling.make_sampler(policy.graphdef,
                                    sampling.from_config(cfg.sampling, d.max_completion_len),
                                    tok.eos_id, tok.pad_id)
    key = jax.random.PRNGKey(cfg.seed + 2)
    samples = sampling.sample_prompts(sampler, policy.params, tok, prompts, mesh,
                                      d.max_prompt_len, bs, key)
    self.assertEqual(samples.seq.shape, (len(prompts), d.max_prompt_len + d.max_completion_len))
    raw = artifacts.sequence_scores(artifacts.raw_score_fn(reward.graphdef), reward.params,
                                    samples.seq, samples.seq_mask, bs, mesh)
    score = artifacts.sequence_scores(jax.jit(reward.score), reward.params, samples.seq,
                                      samples.seq_mask, bs, mesh)
    score, raw = np.asarray(score, np.float64), np.asarray(raw, np.float64)
    self.assertAlmostEqual(raw.mean(), norm["raw_mean"], places=4)  # what the stage scored
    self.assertAlmostEqual(raw.std(), norm["raw_std"], places=4)
    np.testing.assert_allclose(score, norm["gain"] * raw + norm["bias"], rtol=1e-5, atol=1e-5)
    self.assertAlmostEqual(score.mean(), 0.0, delta=1e-3)
    self.assertAlmostEqual(np.std(score), 1.0, delta=1e-3)
    self.assertEqual(samples.texts, sampling.sample_texts(
        sampler, policy.params, tok, prompts, mesh, d.max_prompt_len, bs, key))

    # The first batch's samples are what `ppo.Iteration.rollout` would score: the sampler's
    # output behind the left-padded prompts, and the RM's score of that layout is theirs.
    prompt = batching.prompt_arrays(prompts[:bs], tok, d.max_prompt_len)
    with sharding.use_mesh(mesh):
      b = sharding.shard_batch(prompt, mesh)
      out = sampler(policy.params, b["tokens"], b["mask"], jax.random.fold_in(key, 0))
      seq = jnp.concatenate([b["tokens"], out["tokens"]], axis=1)
      seq_mask = jnp.concatenate([b["mask"], out["mask"]], axis=1)
      rollout_score = jax.jit(reward.score)(reward.params, seq, seq_mask)
    np.testing.assert_array_equal(np.asarray(seq), samples.seq[:bs])
    np.testing.assert_array_equal(np.asarray(seq_mask), samples.seq_mask[:bs])
    np.testing.assert_allclose(np.asarray(rollout_score), score[:bs], rtol=1e-5, atol=1e-5)

  def test_rerun_reuses_sft_and_rm(self):
    def snapshot():
      rows = testing.metric_rows(self.workdir)
      return (os.stat(self.prefs_path).st_mtime_ns,
              sorted(os.listdir(os.path.join(self.workdir, "sft", "checkpoints"))),
              sorted(os.listdir(os.path.join(self.workdir, "rm", "checkpoints"))),
              [r for r in rows if r["stage"] in ("sft", "rm")])

    before = snapshot()
    again = pipeline.run(testing.pipeline_config("rm"), self.workdir)
    self.assertEqual(snapshot(), before)  # no new samples, checkpoints or training steps
    self.assertEqual(again.stages, {})  # both stages were loaded, not run
    first, second = self.result.metrics, again.metrics
    for key in ("eval_accuracy", "eval_gold_agreement", "eval_margin", "eval_loss",
                "normalization/gain", "normalization/bias", "data/train_kept", "data/eval_kept"):
      self.assertAlmostEqual(second[key], first[key], places=5, msg=key)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.reward.params),
                 jax.device_get(self.result.state.params))

  def test_changed_generation_settings_are_an_error(self):
    cfg = testing.pipeline_config("rm")
    cfg.rm.data.annotator_temperature = 0.5
    mtime = os.stat(self.prefs_path).st_mtime_ns
    policy = artifacts.load_policy(os.path.join(self.workdir, "sft"),
                                   sharding.make_mesh(cfg.mesh))
    with self.assertRaisesRegex(ValueError, r"annotator_temperature: 0.1 -> 0.5.*fresh --workdir"):
      preferences.run(cfg, tasks.SortTask(), policy, sharding.make_mesh(cfg.mesh), self.workdir)
    self.assertEqual(os.stat(self.prefs_path).st_mtime_ns, mtime)  # the old pairs are kept


if __name__ == "__main__":
  absltest.main()
