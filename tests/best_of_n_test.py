"""The best-of-N stage: its selection against a numpy loop, and end to end from the shared
pipeline's SFT policy and RM (a row per N with the analytic KL, the summary, reuse), and
with the oracle's ranking the gold reward never falls as N grows."""

import importlib.util
import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

import testing
from rlhf_jax import artifacts, pipeline
from rlhf_jax.stages import best_of_n

NS = (1, 2, 4)  # the `test` preset's best_of_n.n


def _config(**section):
  cfg = testing.pipeline_config("best_of_n")
  cfg.best_of_n.update(**section)
  return testing.from_shared(cfg)


class SelectionTest(absltest.TestCase):

  def test_best_of_first_n_matches_numpy_loop(self):
    rng = np.random.default_rng(0)
    # Integer scores: ties are frequent, and the first best must win them.
    for scores in (rng.standard_normal((7, 8)), rng.integers(0, 3, (7, 8)).astype(float)):
      for n in (1, 2, 5, 8):
        want = []
        for row in scores:
          best = 0
          for j in range(1, n):
            if row[j] > row[best]:
              best = j
          want.append(best)
        np.testing.assert_array_equal(best_of_n.best_indices(scores, n), want)

  def test_per_n_metrics_average_the_kept_samples(self):
    ranking = np.array([[0.0, 2.0, 1.0, 3.0], [5.0, 1.0, 0.0, 9.0]])
    gold = np.array([[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]])
    m = best_of_n.per_n_metrics(ranking, {"gold_reward": gold}, (1, 2, 4))
    self.assertEqual(m[1]["best_of_n/1/gold_reward"], 30.0)  # columns 0, 0
    self.assertEqual(m[2]["best_of_n/2/gold_reward"], 35.0)  # columns 1, 0
    self.assertEqual(m[4]["best_of_n/4/gold_reward"], 60.0)  # columns 3, 3


class BestOfNStageTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.workdir = cls._tmp.name
    cls.out = pipeline.run(_config(), cls.workdir)
    cls.rows = testing.metric_rows(cls.workdir, "best_of_n")

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_a_row_per_n_with_the_analytic_kl(self):
    by_step = {r["step"]: r for r in self.rows if any(k.startswith("best_of_n/") for k in r)}
    self.assertEqual(sorted(by_step), list(NS))
    self.assertEqual(by_step[1]["best_of_n/1/kl"], 0.0)
    self.assertAlmostEqual(by_step[4]["best_of_n/4/kl"], math.log(4) - 3 / 4, places=6)
    for n in NS:
      for key in ("gold_reward", "rm_score"):
        self.assertTrue(np.isfinite(by_step[n][f"best_of_n/{n}/{key}"]), (n, key))

  def test_summary_compares_n1_with_the_largest_n(self):
    m = self.out.metrics
    for name in ("gold_reward", "rm_score"):
      self.assertEqual(m[f"final/sft_{name}"], m[f"best_of_n/1/{name}"])
      self.assertEqual(m[f"final/best_of_n_{name}"], m[f"best_of_n/4/{name}"])
    # The RM ranks: its score of the kept sample cannot fall as N grows (nested sets).
    self.assertGreaterEqual(m["best_of_n/4/rm_score"], m["best_of_n/2/rm_score"])
    self.assertGreaterEqual(m["best_of_n/2/rm_score"], m["best_of_n/1/rm_score"])
    self.assertEqual(m["final/kl"], m["best_of_n/4/kl"])
    self.assertIn("rm/eval_accuracy", m)
    out_dir = os.path.join(self.workdir, "best_of_n")
    self.assertEqual(artifacts.read_summary(out_dir), m)
    if importlib.util.find_spec("matplotlib"):
      self.assertGreater(os.path.getsize(os.path.join(out_dir, best_of_n.PLOT)), 0)

  def test_rerun_reuses_the_summary(self):
    again = pipeline.run(_config(), self.workdir)
    self.assertEqual(again.metrics, self.out.metrics)
    self.assertNotIn("best_of_n", again.stages)  # nothing ran
    self.assertLen(testing.metric_rows(self.workdir, "best_of_n"), len(self.rows))


class OracleBestOfNTest(absltest.TestCase):

  def test_gold_reward_never_falls_with_n(self):
    """Ranked by the gold reward itself, the kept sample's gold reward is the max over
    nested sets (the first N samples), so it cannot fall as N grows."""
    with tempfile.TemporaryDirectory() as wd:
      m = pipeline.run(_config(reward="gold"), wd).metrics
    gold = [m[f"best_of_n/{n}/gold_reward"] for n in NS]
    self.assertEqual(gold, sorted(gold))
    self.assertGreater(gold[-1], gold[0])  # 4 samples of a tiny SFT policy differ
    self.assertNotIn("final/best_of_n_rm_score", m)
    self.assertNotIn("rm/eval_accuracy", m)


if __name__ == "__main__":
  absltest.main()
