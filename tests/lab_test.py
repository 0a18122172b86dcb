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


class WarningTest(absltest.TestCase):

  def _curve(self, stds, means, golds, se=0.01):
    return [{"curve": "rl/x", "method": "rl", "iteration": 10 * i, "kl": float(i),
             "d": float(i) ** 0.5, "gold": g, "gold_se": 0.02, "proxy": float(i),
             "ensemble_std": s, "ensemble_std_se": se, "ensemble_mean": m,
             "ensemble_mean_se": se} for i, (s, m, g) in enumerate(zip(stds, means, golds))]

  def test_onsets_are_moves_beyond_two_standard_errors(self):
    from rlhf_jax.lab import warning  # pylint: disable=g-import-not-at-top
    # 2 SE of a difference: 2 * sqrt(2) * 0.01 = 0.028 for the ensemble, 0.057 for gold
    pts = self._curve(stds=[0.30, 0.32, 0.33, 0.50], means=[0.0, 0.5, 0.48, 0.40],
                      golds=[0.0, 0.3, 0.5, 0.1])
    self.assertEqual(warning.first_rise(pts, "ensemble_std")["iteration"], 20)  # +0.02: noise
    self.assertEqual(warning.first_fall(pts, "ensemble_mean")["iteration"], 30)  # -0.02: noise
    v = warning.verdict(pts)  # gold: best 0.5 at 20, 0.1 at 30 is beyond noise
    self.assertEqual((v["gold_fall_iteration"], v["gold_peak_iteration"]), (30, 20))
    self.assertEqual((v["std_onset_iteration"], v["warned_by_std"]), (20, True))
    self.assertEqual((v["mean_onset_iteration"], v["warned_by_mean"]), (30, True))
    line = warning.sentence("rl/x", v)
    self.assertIn("gold fell beyond noise at iteration 30", line)
    self.assertIn("rose beyond noise at iteration 20: a warning 10 iterations ahead", line)
    self.assertIn("fell beyond noise at iteration 30: a warning, at the same evaluation", line)
    late = warning.verdict(self._curve([0.30, 0.31, 0.31, 0.31, 0.50], [0.0] * 5,
                                       [0.0, 0.3, 0.5, 0.1, 0.1]))
    self.assertEqual((late["std_onset_iteration"], late["warned_by_std"]), (40, False))
    self.assertEqual((late["mean_onset_iteration"], late["warned_by_mean"]), (None, False))
    self.assertIn("never fell beyond noise: no warning", warning.sentence("rl/x", late))
    rising = warning.verdict(self._curve([0.3, 0.4, 0.5], [0.0, 0.1, 0.2], [0.0, 0.1, 0.2]))
    self.assertEqual((rising["gold_fall_iteration"], rising["warned_by_std"]), (None, None))
    self.assertIn("nothing to warn of", warning.sentence("rl/x", rising))
    self.assertIn("rose beyond noise at iteration 10: a false alarm",
                  warning.sentence("rl/x", rising))
    # A dip that gold climbs out of is not its fall: its fall comes after its best
    dip = warning.verdict(self._curve([0.3] * 5, [0.0] * 5, [0.0, 0.3, 0.1, 0.4, 0.2]))
    self.assertEqual((dip["gold_peak_iteration"], dip["gold_fall_iteration"]), (30, 40))
    self.assertIsNone(warning.verdict([{k: v for k, v in p.items() if "ensemble" not in k}
                                       for p in pts]))


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
    worst = ens.with_objective("worst_case")
    np.testing.assert_allclose(np.asarray(jax.jit(worst.score)(worst.params, tokens, mask)),
                               want.min(0), rtol=1e-5, atol=1e-5)
    self.assertEqual((ens.size, ens.objective, ens.critic_source), (3, "mean", members[0]))
    with self.assertRaisesRegex(ValueError, "ensemble.objective is 'median'"):
      ens.with_objective("median")
    other = TransformerConfig(vocab_size=31, d_model=16, num_layers=2, num_heads=2,
                              num_kv_heads=1, mlp_dim=32)
    with self.assertRaisesRegex(ValueError, "member 1's network differs"):
      ensemble.RewardEnsemble.stack([members[0], dataclasses.replace(members[1],
                                                                     model_config=other)])


  def test_ensemble_axis_sharded_on_the_mesh(self):
    """Members placed on a data x expert mesh: the stack splits its member axis over `expert`
    (one member per device pair) and scores as the members do on one device."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import testing  # pylint: disable=g-import-not-at-top
    from rlhf_jax import artifacts, sharding  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import ensemble  # pylint: disable=g-import-not-at-top
    from rlhf_jax.models import RewardModel, TransformerConfig  # pylint: disable=g-import-not-at-top
    cfg = TransformerConfig(vocab_size=31, d_model=16, num_layers=1, num_heads=2,
                            num_kv_heads=1, mlp_dim=32)
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1, expert=4))
    members, want = [], []
    tokens, mask = testing.left_padded_batch(np.random.default_rng(1), (3, 6, 1, 5, 2, 6, 4, 6),
                                             6, 31)
    for k in range(4):
      graphdef, state, _ = testing.random_state(lambda: RewardModel(cfg, nnx.Rngs(0)), seed=k)
      one = artifacts.RewardFunction(graphdef, state, 1.0 + k, 0.1 * k, cfg, None)
      want.append(np.asarray(jax.jit(one.score)(one.params, tokens, mask)))
      members.append(dataclasses.replace(one, params=jax.device_put(
          state, sharding.param_shardings(state, mesh))))
    ens = ensemble.RewardEnsemble.stack(members, "uncertainty_weighted", 0.3)
    leaf = jax.tree.leaves(ens.params)[0]
    self.assertEqual(leaf.sharding.spec[0], "expert")
    self.assertLen(leaf.addressable_shards[0].data, 1)  # one member per device
    with sharding.use_mesh(mesh):
      batch = sharding.shard_batch({"t": tokens, "m": mask}, mesh)
      got = np.asarray(jax.jit(ens.scores)(ens.params, batch["t"], batch["m"]))
      combined = np.asarray(jax.jit(ens.score)(ens.params, batch["t"], batch["m"]))
    want = np.stack(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(combined, want.mean(0) - 0.3 * want.std(0), rtol=1e-5, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "3 stacked members .* mesh axis expert of size 4"):
      ensemble.RewardEnsemble.stack(members[:3])


def _lab_config(preset="test"):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "lab.py")
  spec = importlib.util.spec_from_file_location("lab_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


class LabConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ({"lab.proxy_pairs": (64, 32)}, "lab.proxy_pairs must be increasing positive integers"),
      ({"lab.ensemble_size": 1}, "lab.ensemble_size is 1: use 0"),
      ({"lab.ensemble_size": 0}, "lab.rl.objectives needs an ensemble"),
      ({"lab.ensemble_size": 3, "mesh.expert": 2}, "mesh.expert=2 does not divide"),
      ({"lab.rl.objectives": ("median",)}, "ensemble.objective is 'median'"),
      ({"lab.bon.n": (2, 4)}, "lab.bon.n must start at 1"),
      ({"ppo.reward": "gold"}, "set ppo.reward='model'"),
  )
  def test_bad_lab_settings_are_one_line_errors(self, overrides, message):
    from rlhf_jax import scale  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import __main__ as lab_main  # pylint: disable=g-import-not-at-top
    cfg = _lab_config()
    scale.apply_overrides(cfg, overrides)
    with self.assertRaisesRegex(ValueError, message) as e:
      lab_main.check(cfg)
    self.assertNotIn("\n", str(e.exception))

  def test_every_preset_passes_its_checks(self):
    from rlhf_jax import validate  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import __main__ as lab_main  # pylint: disable=g-import-not-at-top
    for preset in ("", "test", "125m", "1b-8gpu"):
      cfg = _lab_config(preset)
      validate.check(cfg)
      lab_main.check(cfg)
      self.assertEqual(cfg.data.task, "sort", preset)


class LabRunTest(absltest.TestCase):

  def test_lab_end_to_end(self):
    """The lab from the shared pipeline's SFT policy and pairs (copied where the pipeline
    reuses them), proxy RMs of 10 steps, PPO of 4 iterations against each proxy: every
    output, curves starting at (0, 0), fits and the report's findings."""
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import shutil  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    import testing  # pylint: disable=g-import-not-at-top
    from rlhf_jax import scale  # pylint: disable=g-import-not-at-top
    from rlhf_jax.lab import __main__ as lab_main  # pylint: disable=g-import-not-at-top
    cfg = _lab_config("test")
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
      for name in ("fits.json", "bon_proxies.png", "bon_ensembles.png", "rl_proxies.png",
                   "rl_ensembles.png", "rl_warning.png", "bon_vs_rl.png"):
        self.assertTrue(os.path.exists(os.path.join(out, name)), name)
      with open(os.path.join(out, "rl_ensemble_worst_case", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    bon = ["pairs_16", "pairs_256", "member_0", "member_1", "ensemble/mean",
           "ensemble/worst_case", "ensemble/uncertainty_weighted"]
    # PPO, 4 iterations, evaluated at 2 and 4, against each proxy and the worst-case objective
    rl = ["rl/pairs_16", "rl/pairs_256", "rl/ensemble/worst_case"]
    trained = [r for r in rows if r["stage"] == "ppo" and "loss" in r]
    self.assertLen(trained, 4)
    for r in trained:  # the early-warning signals, every iteration, without gold
      self.assertGreaterEqual(r["reward/ensemble_std"], 0.0)
      self.assertTrue(np.isfinite(r["reward/ensemble_mean"]))
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
        self.assertGreater(p["ensemble_std_se"], 0.0)
        self.assertGreater(p["ensemble_mean_se"], 0.0)
        continue
      if p["n"] == 1:  # N = 1 keeps the first sample whatever the ranking: the SFT baseline
        self.assertEqual((p["kl"], p["gold"]), (0.0, 0.0))
      self.assertAlmostEqual(p["kl"], core.best_of_n_kl(p["n"]), places=6)
    self.assertEqual(fitted["rl/pairs_16"]["form"], "rl")
    for curve in rl:
      for signal in ("std", "mean"):
        self.assertIn(fitted[curve]["warning"][f"warned_by_{signal}"], (None, True, False))
      self.assertIn(f"- {curve}: gold ", text)
    self.assertIn("- rl/ensemble/worst_case vs rl/pairs_256: gold at the end", text)
    for curve in curves:
      self.assertIn(f"| {curve} |", text)
      self.assertTrue(np.isfinite(fitted[curve]["r2"]), curve)
    self.assertIn("## What the data shows", text)
