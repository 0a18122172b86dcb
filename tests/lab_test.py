"""The gold-reward lab's math: the over-optimisation fits recover known coefficients, the
analytic best-of-N KL against the exact and a Monte-Carlo KL on small categoricals, and the
ensemble objectives against numpy."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from rlhf_jax.lab import fits
from rlhf_jax.rl import core, ensembles


def _exact_bon_kl(p, n):
  """KL(best-of-n || p) of a categorical whose outcomes are sorted by distinct reward:
  P(best = i) = F_i^n - F_{i-1}^n with F the CDF."""
  cdf = np.cumsum(p)
  q = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
  keep = q > 0
  return float(np.sum(q[keep] * np.log(q[keep] / p[keep]))), q


class FitTest(parameterized.TestCase):

  @parameterized.parameters(("bon", 1.2, 0.3), ("rl", 0.8, 0.25), ("bon", 0.5, -0.05))
  def test_recovers_known_coefficients(self, form, alpha, beta):
    kl = np.linspace(0.0, 25.0, 40)
    clean = fits.Fit(form, alpha, beta, 1.0, 0, None, None).predict(kl)
    noisy = clean + np.random.default_rng(0).normal(0.0, 0.002, kl.shape)
    got = fits.fit(form, kl, noisy)
    np.testing.assert_allclose([got.alpha, got.beta], [alpha, beta], rtol=0.01)
    self.assertGreater(got.r2, 0.999)
    exact = fits.fit(form, kl, clean)
    np.testing.assert_allclose([exact.alpha, exact.beta], [alpha, beta], rtol=1e-9)

  @parameterized.parameters(("bon", 1.2, 0.3), ("rl", 0.8, 0.25))
  def test_peak_is_the_maximum_of_the_fitted_curve(self, form, alpha, beta):
    f = fits.Fit(form, alpha, beta, 1.0, 0, *fits._peak(form, alpha, beta))  # pylint: disable=protected-access
    kl = np.linspace(0.0, 4 * f.peak_kl, 200001)
    curve = f.predict(kl)
    self.assertAlmostEqual(kl[np.argmax(curve)], f.peak_kl, delta=kl[1] * 2)
    self.assertAlmostEqual(curve.max(), f.peak_gold, places=6)

  def test_no_peak_while_gold_rises(self):
    f = fits.fit("bon", [0.0, 1.0, 4.0, 9.0], [0.0, 0.5, 1.1, 1.8])  # beta < 0
    self.assertLess(f.beta, 0)
    self.assertIsNone(f.peak_kl)

  def test_bad_points_are_one_line_errors(self):
    with self.assertRaisesRegex(ValueError, "at least 2 points with KL > 0"):
      fits.fit("rl", [0.0, 1.0], [0.0, 0.2])
    with self.assertRaisesRegex(ValueError, "finite and >= 0"):
      fits.fit("bon", [0.0, -1.0, 2.0], [0.0, 0.1, 0.2])
    with self.assertRaisesRegex(ValueError, "fit form is 'gao'"):
      fits.fit("gao", [1.0, 2.0], [0.1, 0.2])


class BestOfNKlTest(absltest.TestCase):

  def test_monte_carlo_matches_the_exact_kl_below_the_analytic_bound(self):
    p = np.array([0.1, 0.2, 0.3, 0.25, 0.15])  # outcomes sorted by (distinct) reward
    rng = np.random.default_rng(0)
    for n in (2, 4, 8):
      draws = rng.choice(len(p), size=(200_000, n), p=p)
      best = draws.max(axis=1)  # the highest-reward outcome of the n draws
      q_mc = np.bincount(best, minlength=len(p)) / len(best)
      kl_mc = float(np.sum(q_mc[q_mc > 0] * np.log(q_mc[q_mc > 0] / p[q_mc > 0])))
      exact, q = _exact_bon_kl(p, n)
      np.testing.assert_allclose(q_mc, q, atol=4e-3)
      self.assertAlmostEqual(kl_mc, exact, delta=0.01)
      self.assertLess(exact, core.best_of_n_kl(n))  # an upper bound (Beirami et al. 2024)

  def test_analytic_kl_is_the_limit_of_many_outcomes(self):
    p = np.full(20_000, 1 / 20_000)
    for n in (2, 4, 16, 64):
      exact, _ = _exact_bon_kl(p, n)
      np.testing.assert_allclose(exact, core.best_of_n_kl(n), rtol=0.01)


class EnsembleTest(absltest.TestCase):

  def test_objectives_match_numpy(self):
    s = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    want = {"mean": s.mean(0), "worst_case": s.min(0),
            "uncertainty_weighted": s.mean(0) - 0.7 * s.std(0)}
    for name, value in want.items():
      np.testing.assert_allclose(np.asarray(ensembles.combine(s, name, 0.7)), value,
                                 rtol=1e-5, atol=1e-6, err_msg=name)
    self.assertAlmostEqual(float(ensembles.disagreement(s)), float(s.std(0).mean()), places=5)
    agree = np.tile(s[:1], (5, 1))  # identical members: every objective is the member
    for name in want:
      np.testing.assert_allclose(np.asarray(ensembles.combine(agree, name)), s[0], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "ensemble.objective is 'median'"):
      ensembles.combine(s, "median")


if __name__ == "__main__":
  absltest.main()


class RewardEnsembleTest(absltest.TestCase):

  def test_stacked_forward_equals_each_member(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import testing  # pylint: disable=g-import-not-at-top
    from rlhf_jax import artifacts  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import ensemble  # pylint: disable=g-import-not-at-top
    from rlhf_jax.models import RewardModel, TransformerConfig  # pylint: disable=g-import-not-at-top
    cfg = TransformerConfig(vocab_size=31, d_model=16, num_layers=1, num_heads=2,
                            num_kv_heads=1, mlp_dim=32)
    members = []
    for k in range(3):
      graphdef, state, _ = testing.random_state(lambda: RewardModel(cfg, nnx.Rngs(0)), seed=k)
      members.append(artifacts.RewardFunction(graphdef, state, 1.0 + k, -0.5 * k, cfg, None))
    ens = ensemble.RewardEnsemble.stack(members)
    tokens, mask = testing.left_padded_batch(np.random.default_rng(0), (3, 6, 1, 5), 6, 31)
    got = np.asarray(jax.jit(ens.scores)(ens.params, tokens, mask))
    want = np.stack([np.asarray(jax.jit(m.score)(m.params, tokens, mask)) for m in members])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    worst = jax.jit(lambda p, t, m: ens.score(p, t, m, "worst_case"))
    np.testing.assert_allclose(np.asarray(worst(ens.params, tokens, mask)), want.min(0),
                               rtol=1e-5, atol=1e-5)
    self.assertEqual(ens.size, 3)
    other = TransformerConfig(vocab_size=31, d_model=16, num_layers=2, num_heads=2,
                              num_kv_heads=1, mlp_dim=32)
    with self.assertRaisesRegex(ValueError, "member 1's network differs"):
      ensemble.RewardEnsemble.stack([members[0], dataclasses.replace(members[1],
                                                                     model_config=other)])


class LabRunTest(absltest.TestCase):

  def test_lab_end_to_end(self):
    """The lab from the shared pipeline's SFT policy and pairs (copied where the pipeline
    reuses them), proxy RMs of 10 steps, PPO of 4 iterations against each proxy: every
    output, curves starting at (0, 0), fits and the report's findings."""
    import importlib.util  # pylint: disable=g-import-not-at-top
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import shutil  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    import testing  # pylint: disable=g-import-not-at-top
    from rlhf_jax import scale  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import __main__ as lab_main  # pylint: disable=g-import-not-at-top
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "lab.py")
    spec = importlib.util.spec_from_file_location("lab_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("test")
    scale.apply_overrides(cfg, {k: v for k, v in testing.PIPELINE_OVERRIDES.items()
                                if k.split(".")[0] in cfg})
    cfg.rm.train.update(num_steps=10, eval_every=10, checkpoint_every=10)
    cfg.rm.optim.decay_steps = 10
    cfg.lab.update(proxy_pairs=(16, 256), ensemble_pairs=64)
    shared, _ = testing.shared_pipeline()
    cfg.sft_checkpoint = os.path.join(shared, "sft")
    with tempfile.TemporaryDirectory() as wd:
      os.makedirs(os.path.join(wd, "rm"))
      for name in os.listdir(os.path.join(shared, "rm")):
        if name.startswith("preferences_"):
          shutil.copy(os.path.join(shared, "rm", name), os.path.join(wd, "rm", name))
      fitted = lab_main.run(cfg, wd)
      out = os.path.join(wd, "lab")
      with open(os.path.join(out, "points.jsonl")) as f:
        points = [json.loads(line) for line in f]
      with open(os.path.join(out, "report.md")) as f:
        text = f.read()
      for name in ("fits.json", "bon_proxies.png", "bon_ensembles.png", "rl_proxies.png"):
        self.assertTrue(os.path.exists(os.path.join(out, name)), name)
    bon = ["pairs_16", "pairs_256", "member_0", "member_1", "ensemble/mean",
           "ensemble/worst_case", "ensemble/uncertainty_weighted"]
    rl = ["rl/pairs_16", "rl/pairs_256"]  # PPO, 4 iterations, evaluated at 2 and 4
    curves = bon + rl
    self.assertCountEqual(list(fitted), curves)
    self.assertLen(points, len(bon) * 4 + len(rl) * 3)
    for p in points:
      if p["method"] == "rl":
        self.assertIn(p["iteration"], (0, 2, 4))
        if p["iteration"] == 0:  # the SFT policy: where the curve starts
          self.assertEqual((p["kl"], p["gold"]), (0.0, 0.0))
        else:
          self.assertGreater(p["kl"], 0.0)
        continue
      if p["n"] == 1:  # N = 1 keeps the first sample whatever the ranking: the SFT baseline
        self.assertEqual((p["kl"], p["gold"]), (0.0, 0.0))
      self.assertAlmostEqual(p["kl"], core.best_of_n_kl(p["n"]), places=6)
    self.assertEqual(fitted["rl/pairs_16"]["form"], "rl")
    for curve in curves:
      self.assertIn(f"| {curve} |", text)
      self.assertTrue(np.isfinite(fitted[curve]["r2"]), curve)
    self.assertIn("## What the data shows", text)
