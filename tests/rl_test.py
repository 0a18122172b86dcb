"""RL math (rlhf_jax.rl: core, advantages, losses) against independent float64 numpy / python
references, and the registries that pick them by name."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.rl import advantages, core, losses

# Response lengths per row: full, single token, empty, and a few in between.
_N = 9
_LENGTHS = (9, 1, 0, 5, 8, 3)


def _right_mask(lengths, n=_N):
  return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_masked_mean(x, mask):
  x = np.asarray(x, np.float64)
  m = np.asarray(mask, np.float64)
  return (x * m).sum() / max(m.sum(), 1.0)


def _ref_gae(rewards, values, lengths, gamma, lam):
  """Plain backwards loop over t, per row, only over the valid prefix."""
  b, n = rewards.shape
  adv = np.zeros((b, n), np.float64)
  ret = np.zeros((b, n), np.float64)
  for i in range(b):
    last_adv = 0.0
    for t in reversed(range(lengths[i])):
      next_v = float(values[i, t + 1]) if t + 1 < lengths[i] else 0.0
      delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
      last_adv = delta + gamma * lam * last_adv
      adv[i, t] = last_adv
      ret[i, t] = last_adv + float(values[i, t])
  return adv, ret


class GaeTest(parameterized.TestCase):

  @parameterized.parameters((1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0), (0.95, 0.5))
  def test_matches_python_loop(self, gamma, lam):
    rng = np.random.default_rng(0)
    b = len(_LENGTHS)
    # Garbage (large) rewards / values on pads must be ignored.
    rewards = rng.normal(size=(b, _N)).astype(np.float32)
    values = rng.normal(size=(b, _N)).astype(np.float32)
    mask = _right_mask(_LENGTHS)
    rewards = np.where(mask > 0, rewards, 100.0).astype(np.float32)
    values = np.where(mask > 0, values, -50.0).astype(np.float32)

    gae = jax.jit(advantages.gae, static_argnames=("gamma", "lam"))
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                   gamma=gamma, lam=lam)
    adv, ret = np.asarray(adv), np.asarray(ret)
    ref_adv, ref_ret = _ref_gae(rewards, values, _LENGTHS, gamma, lam)

    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # Exactly 0 on pads (including the whole all-zero row).
    self.assertTrue(np.all(adv[mask == 0] == 0.0))
    self.assertTrue(np.all(ret[mask == 0] == 0.0))
    self.assertTrue(np.all(adv[2] == 0.0))
    # returns = advantages + values on valid tokens.
    valid = mask > 0
    np.testing.assert_allclose(ret[valid], adv[valid] + values[valid], rtol=1e-6, atol=1e-6)

  def test_lambda_one_gamma_one_is_reward_to_go_minus_value(self):
    rng = np.random.default_rng(1)
    b = len(_LENGTHS)
    mask = _right_mask(_LENGTHS)
    rewards = (rng.normal(size=(b, _N)) * mask).astype(np.float32)
    values = rng.normal(size=(b, _N)).astype(np.float32)
    adv, _ = jax.jit(advantages.gae, static_argnames=("gamma", "lam"))(
        rewards, values, mask, gamma=1.0, lam=1.0)
    adv = np.asarray(adv)
    for i, length in enumerate(_LENGTHS):
      for t in range(length):
        to_go = float(np.sum(rewards[i, t:length].astype(np.float64)))
        self.assertAlmostEqual(adv[i, t], to_go - float(values[i, t]), places=4)

  def test_lambda_zero_is_one_step_td(self):
    rng = np.random.default_rng(2)
    mask = _right_mask((4, 2))
    rewards = rng.normal(size=(2, _N)).astype(np.float32)
    values = rng.normal(size=(2, _N)).astype(np.float32)
    adv, _ = advantages.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    adv = np.asarray(adv)
    # Row 0, t=1 (not last): r + gamma V_{t+1} - V_t; t=3 (last): r - V_t.
    self.assertAlmostEqual(adv[0, 1], rewards[0, 1] + 0.9 * values[0, 2] - values[0, 1], places=5)
    self.assertAlmostEqual(adv[0, 3], rewards[0, 3] - values[0, 3], places=5)
    self.assertAlmostEqual(adv[1, 1], rewards[1, 1] - values[1, 1], places=5)


class KlTest(parameterized.TestCase):

  def _dists(self, seed, k=5):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k))
    q = rng.dirichlet(np.ones(k))
    return p, q

  @parameterized.product(kind=("k1", "k3"), seed=(0, 1, 2))
  def test_unbiased_by_exact_enumeration(self, kind, seed):
    p, q = self._dists(seed)
    exact_kl = float(np.sum(p * (np.log(p) - np.log(q))))
    # One "token" per class: logp = log p(x), ref_logp = log q(x).
    logp = jnp.asarray(np.log(p)[None, :], jnp.float32)
    ref_logp = jnp.asarray(np.log(q)[None, :], jnp.float32)
    k = np.asarray(jax.jit(core.kl_per_token, static_argnames="kind")(
        logp, ref_logp, kind=kind), np.float64)[0]
    # Independent per-class reference for the estimator itself.
    log_r = np.log(q) - np.log(p)  # r = q / p
    ref_k = -log_r if kind == "k1" else (np.exp(log_r) - 1.0) - log_r
    np.testing.assert_allclose(k, ref_k, rtol=1e-5, atol=1e-6)
    self.assertAlmostEqual(float(np.sum(p * k)), exact_kl, places=5)

  @parameterized.parameters(1.0, 0.7)
  def test_exact_token_kl_matches_numpy(self, temperature):
    """core.token_kl_exact (the held-out `eval/kl`, `final/kl`) against the sum over the
    vocabulary in numpy, and the sequence KL by enumerating every 2-token sequence."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(2, 3, 5)) * 2.0
    ref_logits = rng.normal(size=(2, 3, 5)) * 2.0
    got = np.asarray(core.token_kl_exact(jnp.asarray(logits, jnp.float32),
                                         jnp.asarray(ref_logits, jnp.float32), temperature))
    def softmax(x):
      e = np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
      return e / e.sum(-1, keepdims=True)
    p, q = softmax(logits), softmax(ref_logits)
    np.testing.assert_allclose(got, np.sum(p * np.log(p / q), -1), rtol=1e-5, atol=1e-6)
    # Chain rule: a 2-token "policy" whose 2nd-token logits depend on the 1st token. The mean
    # over pi's sequences of the summed per-position KL is the KL of the joint distributions.
    l1, r1 = rng.normal(size=4), rng.normal(size=4)
    l2, r2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    p1, q1, p2, q2 = softmax(l1), softmax(r1), softmax(l2), softmax(r2)
    joint_p, joint_q = p1[:, None] * p2, q1[:, None] * q2
    exact = float(np.sum(joint_p * np.log(joint_p / joint_q)))
    per_seq = np.asarray(core.token_kl_exact(  # rows: first token a; positions 1 and 2
        jnp.asarray(np.stack([np.broadcast_to(l1, (4, 4)), l2], 1), jnp.float32),
        jnp.asarray(np.stack([np.broadcast_to(r1, (4, 4)), r2], 1), jnp.float32),
        temperature)).sum(1)
    self.assertAlmostEqual(float(np.sum(p1 * per_seq)), exact, places=5)

  def test_k3_nonnegative_and_k1_can_be_negative(self):
    rng = np.random.default_rng(3)
    logp = jnp.asarray(rng.normal(size=(4, 64)) * 3.0, jnp.float32)
    ref_logp = jnp.asarray(rng.normal(size=(4, 64)) * 3.0, jnp.float32)
    k3 = np.asarray(core.kl_per_token(logp, ref_logp, "k3"))
    k1 = np.asarray(core.kl_per_token(logp, ref_logp, "k1"))
    self.assertTrue(np.all(k3 >= 0.0))
    self.assertTrue(np.any(k1 < 0.0))
    # Equal distributions: both exactly 0.
    np.testing.assert_array_equal(np.asarray(core.kl_per_token(logp, logp, "k3")), 0.0)
    np.testing.assert_array_equal(np.asarray(core.kl_per_token(logp, logp, "k1")), 0.0)

  def test_default_is_k1(self):
    logp = jnp.asarray([[-1.0, -2.0]])
    ref = jnp.asarray([[-1.5, -0.5]])
    np.testing.assert_allclose(np.asarray(core.kl_per_token(logp, ref)), [[0.5, -1.5]])

  def test_unknown_kind_raises(self):
    x = jnp.zeros((1, 3))
    with self.assertRaisesRegex(ValueError, "kl_estimator is 'k4'"):
      core.kl_per_token(x, x, "k4")

  @parameterized.parameters("k1", "k3")
  def test_monte_carlo(self, kind):
    p, q = self._dists(7)
    exact_kl = float(np.sum(p * (np.log(p) - np.log(q))))
    samples = jax.random.categorical(jax.random.key(0), jnp.log(jnp.asarray(p)), shape=(200_000,))
    logp = jnp.log(jnp.asarray(p, jnp.float32))[samples][None]
    ref_logp = jnp.log(jnp.asarray(q, jnp.float32))[samples][None]
    k = np.asarray(core.kl_per_token(logp, ref_logp, kind), np.float64)[0]
    stderr = k.std() / np.sqrt(k.size)
    self.assertLess(abs(k.mean() - exact_kl), 5 * stderr + 1e-4)


class RewardsTest(absltest.TestCase):

  def test_rlhf_rewards(self):
    rng = np.random.default_rng(4)
    b = len(_LENGTHS)
    mask = _right_mask(_LENGTHS)
    kl = rng.normal(size=(b, _N)).astype(np.float32)  # nonzero on pads too
    scores = rng.normal(size=(b,)).astype(np.float32) + 3.0
    beta = 0.05
    rewards, non_score = jax.jit(core.rlhf_rewards)(kl, scores, mask, beta)
    rewards, non_score = np.asarray(rewards), np.asarray(non_score)

    ref_non_score = np.zeros((b, _N))
    ref_rewards = np.zeros((b, _N))
    for i, length in enumerate(_LENGTHS):
      for t in range(length):
        ref_non_score[i, t] = -beta * float(kl[i, t])
        ref_rewards[i, t] = ref_non_score[i, t]
      if length > 0:
        ref_rewards[i, length - 1] += float(scores[i])
    np.testing.assert_allclose(non_score, ref_non_score, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-6, atol=1e-6)
    self.assertTrue(np.all(rewards[mask == 0] == 0.0))
    self.assertTrue(np.all(non_score[mask == 0] == 0.0))
    # The score lands at exactly one place per non-empty row, and nowhere on the empty row.
    diff = rewards - non_score
    for i, length in enumerate(_LENGTHS):
      nz = np.flatnonzero(np.abs(diff[i]) > 1e-6)
      if length == 0:
        self.assertEqual(nz.size, 0)
        np.testing.assert_array_equal(rewards[i], 0.0)
      else:
        np.testing.assert_array_equal(nz, [length - 1])
        self.assertAlmostEqual(diff[i, length - 1], scores[i], places=5)

  def test_last_index(self):
    n = 6
    masks = np.array([
        [1, 1, 1, 0, 0, 0],  # right-padded
        [0, 0, 1, 1, 1, 1],  # left-padded
        [0, 1, 1, 1, 0, 0],  # both
        [1, 1, 1, 1, 1, 1],  # no padding
        [0, 0, 0, 0, 0, 0],  # all pads
        [1, 0, 0, 0, 0, 0],  # single token at 0
    ])
    ref = []
    for row in masks:
      idx = [t for t in range(n) if row[t]]
      ref.append(idx[-1] if idx else 0)
    f = jax.jit(core.last_index)
    for dtype in (np.int32, np.float32, bool):
      np.testing.assert_array_equal(np.asarray(f(jnp.asarray(masks.astype(dtype)))), ref)


class WhitenTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_masked_whiten(self, shift_mean):
    rng = np.random.default_rng(5)
    b = len(_LENGTHS)
    mask = _right_mask(_LENGTHS)
    x = (rng.normal(size=(b, _N)) * 3.0 + 2.0).astype(np.float32)
    x = np.where(mask > 0, x, 1e3).astype(np.float32)  # pads must not leak in
    out = np.asarray(jax.jit(core.masked_whiten, static_argnames="shift_mean")(
        x, mask, shift_mean=shift_mean), np.float64)

    valid = mask > 0
    xv = x[valid].astype(np.float64)
    mean, std = xv.mean(), xv.std(ddof=0)
    ref = np.zeros((b, _N))
    ref[valid] = (xv - mean) / std + (0.0 if shift_mean else mean)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    self.assertTrue(np.all(out[~valid] == 0.0))
    self.assertAlmostEqual(out[valid].std(ddof=0), 1.0, places=5)
    self.assertAlmostEqual(out[valid].mean(), 0.0 if shift_mean else mean, places=5)

  def test_masked_mean(self):
    rng = np.random.default_rng(6)
    mask = _right_mask(_LENGTHS)
    x = rng.normal(size=mask.shape).astype(np.float32)
    self.assertAlmostEqual(float(core.masked_mean(x, mask)), _ref_masked_mean(x, mask),
                           places=5)
    # All-pad mask: 0, not NaN.
    self.assertEqual(float(core.masked_mean(x, np.zeros_like(mask))), 0.0)
    np.testing.assert_allclose(
        np.asarray(core.masked_mean(x, mask, axis=1))[[0, 1, 3]],
        [x[0].mean(), x[1, 0], x[3, :5].mean()], rtol=1e-5)


class LossTest(parameterized.TestCase):

  def _batch(self, seed):
    rng = np.random.default_rng(seed)
    b = len(_LENGTHS)
    mask = _right_mask(_LENGTHS)
    old_logp = -rng.uniform(0.1, 3.0, size=(b, _N)).astype(np.float32)
    logp = (old_logp + rng.normal(size=(b, _N)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(b, _N)).astype(np.float32)
    return mask, logp, old_logp, adv

  @parameterized.parameters(0.2, 0.1)
  def test_policy_loss(self, clip):
    mask, logp, old_logp, adv = self._batch(7)
    loss, metrics = jax.jit(losses.policy_loss)(logp, old_logp, adv, mask, clip)

    terms, clipped, lr2, ratios = [], [], [], []
    for i, j in zip(*np.nonzero(mask)):
      lr = float(logp[i, j]) - float(old_logp[i, j])
      r = np.exp(lr)
      a = float(adv[i, j])
      l1, l2 = -a * r, -a * min(max(r, 1.0 - clip), 1.0 + clip)
      terms.append(max(l1, l2))
      clipped.append(float(l2 > l1))
      lr2.append(lr * lr)
      ratios.append(r)
    self.assertAlmostEqual(float(loss), np.mean(terms), places=5)
    self.assertAlmostEqual(float(metrics["policy/clipfrac"]), np.mean(clipped), places=5)
    self.assertAlmostEqual(float(metrics["policy/approxkl"]), 0.5 * np.mean(lr2), places=5)
    self.assertAlmostEqual(float(metrics["val/ratio"]), np.mean(ratios), places=5)
    self.assertGreater(np.mean(clipped), 0.0)  # clipping is engaged in this batch

  def test_policy_loss_ratio_one(self):
    mask, _, old_logp, adv = self._batch(8)
    loss, metrics = jax.jit(losses.policy_loss)(old_logp, old_logp, adv, mask, 0.2)
    self.assertEqual(float(metrics["val/ratio"]), 1.0)
    self.assertEqual(float(metrics["policy/clipfrac"]), 0.0)
    self.assertEqual(float(metrics["policy/approxkl"]), 0.0)
    self.assertAlmostEqual(float(loss), -_ref_masked_mean(adv, mask), places=6)

  def test_policy_loss_gradient_is_zero_when_clipped(self):
    # Positive advantage and ratio above 1 + clip: the clipped branch wins, no gradient.
    logp = jnp.asarray([[0.5, 0.0]])
    old = jnp.asarray([[0.0, 0.0]])
    adv = jnp.asarray([[1.0, 1.0]])
    mask = jnp.asarray([[1.0, 1.0]])
    g = jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, 0.2)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), [[0.0, -0.5]], atol=1e-6)

  @staticmethod
  def _value_batch():
    """(values, old values, returns, mask): values within ~0.5 of the old ones."""
    rng = np.random.default_rng(9)
    b = len(_LENGTHS)
    old_v = rng.normal(size=(b, _N)).astype(np.float32)
    v = (old_v + rng.normal(size=(b, _N)) * 0.5).astype(np.float32)
    ret = rng.normal(size=(b, _N)).astype(np.float32)
    return v, old_v, ret, _right_mask(_LENGTHS)

  @parameterized.parameters(0.2, 0.5)
  def test_value_loss(self, clip):
    v, old_v, ret, mask = self._value_batch()
    loss, metrics = jax.jit(losses.value_loss)(v, old_v, ret, mask, clip)

    terms, clipped = [], []
    for i, j in zip(*np.nonzero(mask)):
      vv, vo, rr = float(v[i, j]), float(old_v[i, j]), float(ret[i, j])
      vc = min(max(vv, vo - clip), vo + clip)
      l1, l2 = (vv - rr) ** 2, (vc - rr) ** 2
      terms.append(0.5 * max(l1, l2))
      clipped.append(float(l2 > l1))
    self.assertAlmostEqual(float(loss), np.mean(terms), places=5)
    self.assertGreater(np.mean(clipped), 0.0)  # clipping is engaged in this batch
    del metrics  # val/clipfrac is checked in test_value_clipfrac



  # Regression: `old + clip(V - old, -c, c)` is not exactly V in float32 when unclipped, which
  # counted rounding error as clipping; the clipped value is now `clip(V, old - c, old + c)`.
  def test_value_clipfrac(self):
    # Minimal repro: |V - V_old| = 0.2 < clip = 0.5, nothing is clipped, clipfrac must be 0.
    one = jnp.ones((1, 1))
    _, metrics = jax.jit(losses.value_loss)(0.1 * one, 0.3 * one, 0.2 * one, one, 0.5)
    self.assertEqual(float(metrics["val/clipfrac"]), 0.0)
    v, old_v, ret, mask = self._value_batch()
    for clip in (0.2, 0.5):
      _, metrics = jax.jit(losses.value_loss)(v, old_v, ret, mask, clip)
      clipped = []
      for i, j in zip(*np.nonzero(mask)):
        vv, vo, rr = float(v[i, j]), float(old_v[i, j]), float(ret[i, j])
        vc = min(max(vv, vo - clip), vo + clip)
        clipped.append(float((vc - rr) ** 2 > (vv - rr) ** 2))
      self.assertAlmostEqual(float(metrics["val/clipfrac"]), np.mean(clipped), places=5)

  def test_value_loss_unclipped_when_equal(self):
    rng = np.random.default_rng(10)
    mask = _right_mask(_LENGTHS)
    v = rng.normal(size=mask.shape).astype(np.float32)
    ret = rng.normal(size=mask.shape).astype(np.float32)
    loss, metrics = losses.value_loss(v, v, ret, mask, 0.2)
    self.assertAlmostEqual(float(loss), 0.5 * _ref_masked_mean((v - ret) ** 2, mask), places=5)
    self.assertEqual(float(metrics["val/clipfrac"]), 0.0)


class AdaptiveKlTest(parameterized.TestCase):

  @parameterized.parameters(
      (6.0, 6.0),    # on target: beta unchanged
      (6.6, 6.0),    # +10%: unclipped
      (5.1, 6.0),    # -15%: unclipped
      (60.0, 6.0),   # far above: clipped at +0.2
      (0.0, 6.0),    # far below: clipped at -0.2
      (-3.0, 6.0),   # negative KL estimate: clipped at -0.2
  )
  def test_closed_form(self, kl, target):
    beta0, horizon, n = 0.1, 10_000, 256
    e = kl / target - 1.0
    e_clipped = -0.2 if e < -0.2 else (0.2 if e > 0.2 else e)
    beta = beta0
    for step in range(1, 11):
      beta = core.adaptive_kl_coef(beta, kl, target, horizon, n)
      expected = beta0 * np.prod([1.0 + e_clipped * n / horizon] * step)
      self.assertAlmostEqual(beta, expected, places=12)
    if abs(e) > 0.2:
      self.assertAlmostEqual(beta, beta0 * (1.0 + np.sign(e) * 0.2 * n / horizon) ** 10, places=12)


class TokenLogprobsTest(parameterized.TestCase):

  @parameterized.parameters(0.7, 1.0)
  def test_logprobs_and_entropy(self, temperature):
    rng = np.random.default_rng(11)
    b, n, v = 3, 5, 11
    logits = (rng.normal(size=(b, n, v)) * 4.0).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, n)).astype(np.int32)
    lp_fn = jax.jit(core.token_logprobs, static_argnames="temperature")
    ent_fn = jax.jit(core.token_entropy, static_argnames="temperature")
    lp = np.asarray(lp_fn(logits, tokens, temperature=temperature))
    ent = np.asarray(ent_fn(logits, temperature=temperature))

    ref_logp = _np_log_softmax(logits.astype(np.float64) / temperature)
    ref_lp = np.zeros((b, n))
    ref_ent = np.zeros((b, n))
    for i in range(b):
      for t in range(n):
        ref_lp[i, t] = ref_logp[i, t, tokens[i, t]]
        ref_ent[i, t] = -np.sum(np.exp(ref_logp[i, t]) * ref_logp[i, t])
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
    self.assertEqual(lp.dtype, np.float32)

  def test_logprob_gradient(self):
    """d log pi(token) / d logits = (onehot(token) - softmax(logits / T)) / T."""
    rng = np.random.default_rng(13)
    b, n, v, temperature = 2, 3, 9, 0.7
    logits = (rng.normal(size=(b, n, v)) * 3.0).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, n)).astype(np.int32)
    w = rng.normal(size=(b, n))  # a weighted sum, so every position's gradient shows
    grad = jax.jit(jax.grad(lambda x: jnp.sum(
        core.token_logprobs(x, tokens, temperature) * w)))(logits)
    probs = np.exp(_np_log_softmax(logits.astype(np.float64) / temperature))
    want = (np.eye(v)[tokens] - probs) / temperature * w[..., None]
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-6)

  def test_bfloat16_logits_give_float32(self):
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 3)), jnp.int32)
    lp = core.token_logprobs(logits, tokens, 0.7)
    self.assertEqual(lp.dtype, jnp.float32)
    ref_logp = _np_log_softmax(np.asarray(logits.astype(jnp.float32), np.float64) / 0.7)
    ref = np.take_along_axis(ref_logp, np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-2)


class RegistryTest(absltest.TestCase):
  """The registries the config names choose from: the registered function is the plain one
  with the config's hyper-parameters, and a wrong name is one line listing the choices."""

  def test_registered_pieces_match_the_plain_functions(self):
    rng = np.random.default_rng(0)
    b, n = 3, 5
    mask = (np.arange(n)[None] < np.array([[5], [3], [1]])).astype(np.float32)
    rewards, values = rng.normal(size=(b, n)), rng.normal(size=(b, n))
    hp = core.RLParams(gamma=0.9, lam=0.8, clip_ratio=0.1, value_clip=0.3)
    ep = advantages.Episodes(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                             jnp.asarray(mask))
    got = advantages.ADVANTAGE_ESTIMATORS.get("gae")(ep, hp)
    want = advantages.gae(ep.rewards_BxN, ep.values_BxN, ep.mask_BxN, 0.9, 0.8)
    for a, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    logp, old = jnp.asarray(rng.normal(size=(b, n))), jnp.asarray(rng.normal(size=(b, n)))
    adv = jnp.asarray(rng.normal(size=(b, n)))
    self.assertEqual(float(losses.POLICY_LOSSES.get("clipped")(logp, old, adv, mask, hp)[0]),
                     float(losses.policy_loss(logp, old, adv, mask, 0.1)[0]))
    self.assertEqual(float(losses.VALUE_LOSSES.get("clipped")(logp, old, adv, mask, hp)[0]),
                     float(losses.value_loss(logp, old, adv, mask, 0.3)[0]))
    for kind in ("k1", "k3"):
      np.testing.assert_array_equal(np.asarray(core.KL_ESTIMATORS.get(kind)(logp - old)),
                                    np.asarray(core.kl_per_token(logp, old, kind)))

  def test_unknown_name_lists_the_choices(self):
    with self.assertRaisesRegex(ValueError, r"^ppo.advantage_estimator is 'td'; choose one of "
                                r"\('gae', 'grpo', 'reinforce_pp', 'rloo'\)\.$"):
      advantages.ADVANTAGE_ESTIMATORS.get("td")
    with self.assertRaisesRegex(ValueError, "registered twice"):
      losses.POLICY_LOSSES.register("clipped")(lambda *a: None)

  def test_params_from_config(self):
    from rlhf_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg = config_lib.ppo_config()
    cfg.ppo.update(gamma=0.99, clip_ratio=0.3, kl_estimator="k3")
    hp = core.RLParams.from_config(cfg.ppo, temperature=0.7)
    self.assertEqual((hp.gamma, hp.clip_ratio, hp.kl_estimator, hp.temperature),
                     (0.99, 0.3, "k3", 0.7))
    hash(hp)  # static: jitted functions close over it


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _batch(seed=0, groups=3, g=4, n=6):
  """Scores, per-token rewards and a mask with padded rows and one all-masked row."""
  rng = np.random.default_rng(seed)
  b = groups * g
  lengths = rng.integers(1, n + 1, b)
  lengths[1] = 0  # an all-masked row (an empty response)
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  scores = rng.normal(size=b).astype(np.float32)
  scores[g:2 * g] = 0.5  # a group whose rewards are all equal
  rewards = (rng.normal(scale=0.1, size=(b, n)) * mask).astype(np.float32)
  return scores, rewards, mask


class CriticFreeAdvantageTest(parameterized.TestCase):
  """GRPO, RLOO and REINFORCE++ against python loops written from the papers' formulas."""

  def _episodes(self, scores, rewards, mask):
    return advantages.Episodes(jnp.asarray(rewards), jnp.zeros_like(jnp.asarray(rewards)),
                               jnp.asarray(mask), jnp.asarray(scores))

  @parameterized.parameters((4, True), (4, False), (1, True), (2, True))
  def test_grpo(self, g, scale):
    scores, rewards, mask = _batch(groups=12 // g if g > 1 else 12, g=g)
    hp = core.RLParams(group_size=g, scale_rewards=scale)
    adv, ret = advantages.ADVANTAGE_ESTIMATORS.get("grpo")(
        self._episodes(scores, rewards, mask), hp)
    want = np.zeros_like(mask, np.float64)
    for start in range(0, len(scores), g):
      r = scores[start:start + g].astype(np.float64)
      for i in range(g):
        a = r[i] - r.mean()
        if scale:
          std = np.std(r, ddof=1) if g > 1 else 0.0  # Shao et al.; torch.std is unbiased
          a = a / (std + advantages.GROUP_EPS)
        want[start + i] = a * mask[start + i]
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ret), np.asarray(adv))
    if g == 4:  # the tied group contributes nothing, and is counted
      np.testing.assert_array_equal(np.asarray(adv)[4:8], 0.0)
      zero = np.asarray(advantages.group_std_is_zero(jnp.asarray(scores), g))
      np.testing.assert_array_equal(zero, [False, True, False])
    self.assertGreater(np.abs(want).max(), 0.1 if g > 1 else -1)  # not vacuous (G > 1)

  @parameterized.parameters(1, 3, 4)
  def test_rloo(self, k):
    scores, rewards, mask = _batch(seed=1, groups=12 // k, g=k)
    hp = core.RLParams(group_size=k)
    adv, _ = advantages.ADVANTAGE_ESTIMATORS.get("rloo")(self._episodes(scores, rewards, mask),
                                                          hp)
    seq = (rewards.astype(np.float64) * mask).sum(axis=1)  # KL folded into the reward
    want = np.zeros_like(mask, np.float64)
    for start in range(0, len(seq), k):
      for i in range(k):
        others = [seq[start + j] for j in range(k) if j != i]
        a = seq[start + i] - np.mean(others) if others else 0.0
        want[start + i] = a * mask[start + i]
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(1.0, 0.9)
  def test_reinforce_pp(self, gamma):
    _, rewards, mask = _batch(seed=2)
    hp = core.RLParams(gamma=gamma)
    adv, _ = advantages.ADVANTAGE_ESTIMATORS.get("reinforce_pp")(
        self._episodes(np.zeros(len(mask), np.float32), rewards, mask), hp)
    ret = np.zeros_like(mask, np.float64)
    for b in range(mask.shape[0]):
      g = 0.0
      for t in reversed(range(mask.shape[1])):
        if mask[b, t]:
          g = rewards[b, t] + gamma * g
          ret[b, t] = g
    valid = mask > 0
    mean, std = ret[valid].mean(), ret[valid].std()
    want = np.where(valid, (ret - mean) / np.sqrt(std ** 2 + 1e-8), 0.0)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-4, atol=1e-5)

  def test_group_must_divide_the_batch(self):
    scores, rewards, mask = _batch()
    with self.assertRaisesRegex(ValueError, "does not divide into groups of 5"):
      advantages.ADVANTAGE_ESTIMATORS.get("grpo")(self._episodes(scores, rewards, mask),
                                                  core.RLParams(group_size=5))


class GrpoLossTest(parameterized.TestCase):

  @parameterized.product(aggregation=("token_mean", "sequence_mean", "fixed_length"),
                         kl=(("k3", 0.04), ("k2", 0.1), ("k3", 0.0)))
  def test_matches_numpy(self, aggregation, kl):
    kind, beta = kl
    _, _, mask = _batch(seed=3)
    rng = np.random.default_rng(4)
    logp = rng.normal(-2.0, 0.5, mask.shape)
    old = logp + rng.normal(0, 0.3, mask.shape)
    ref = logp + rng.normal(0, 0.3, mask.shape)
    adv = rng.normal(size=mask.shape) * mask
    hp = core.RLParams(clip_low=0.2, clip_high=0.28, kl_loss_coef=beta, kl_loss_estimator=kind,
                       loss_aggregation=aggregation)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, metrics = losses.POLICY_LOSSES.get("grpo")(f32(logp), f32(old), f32(adv), f32(mask),
                                                     hp, f32(ref))
    ratio = np.exp(logp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.28))
    d = logp - ref
    kl_tok = np.exp(-d) - 1 + d if kind == "k3" else 0.5 * d ** 2
    per = per + beta * kl_tok
    if aggregation == "token_mean":
      want = (per * mask).sum() / mask.sum()
    elif aggregation == "sequence_mean":
      want = np.mean([(per[b] * mask[b]).sum() / max(mask[b].sum(), 1)
                      for b in range(len(mask))])
    else:
      want = (per * mask).sum() / mask.size
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    self.assertEqual("objective/kl_loss" in metrics, beta > 0)

  def test_asymmetric_clip_gradients(self):
    """Ratios above 1 + clip_high (positive advantage) or below 1 - clip_low (negative) get
    no gradient; inside the range they do."""
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.asarray([[1.25, 1.3, 0.85, 0.75]]))
    adv = jnp.asarray([[1.0, 1.0, -1.0, -1.0]])
    hp = core.RLParams(clip_low=0.2, clip_high=0.28)
    g = jax.grad(lambda lp: losses.POLICY_LOSSES.get("grpo")(lp, old, adv, jnp.ones((1, 4)),
                                                             hp)[0])(logp)
    np.testing.assert_array_equal(np.asarray(g)[0] != 0, [True, False, True, False])

  def test_k2(self):
    d = jnp.asarray([[-0.5, 0.0, 2.0]])
    np.testing.assert_allclose(np.asarray(core.kl_per_token(d, jnp.zeros_like(d), "k2")),
                               [[0.125, 0.0, 2.0]])


class PreferenceLossTest(parameterized.TestCase):
  """DPO, cDPO and IPO against the papers' formulas on summed sequence log-probs."""

  @parameterized.parameters(("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0))
  def test_matches_formula(self, loss_type, beta, eps):
    rng = np.random.default_rng(5)
    pc, pr, rc, rr = (rng.normal(-20, 3, 16) for _ in range(4))
    loss, m = losses.preference_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                                     beta=beta, loss_type=loss_type, label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    if loss_type == "dpo":
      want = np.mean(-(1 - eps) * np.log(_np_sigmoid(beta * h))
                     - eps * np.log(_np_sigmoid(-beta * h)))
    else:
      want = np.mean((h - 1 / (2 * beta)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), np.mean(beta * (pc - rc)), rtol=1e-4)
    np.testing.assert_allclose(float(m["rewards/rejected"]), np.mean(beta * (pr - rr)),
                               rtol=1e-4)
    np.testing.assert_allclose(float(m["rewards/margins"]), np.mean(beta * h), rtol=1e-4,
                               atol=1e-5)
    self.assertAlmostEqual(float(m["rewards/accuracies"]), np.mean(h > 0), places=6)

  def test_best_of_n_kl(self):
    self.assertEqual(core.best_of_n_kl(1), 0.0)
    for n in (2, 4, 16):
      self.assertAlmostEqual(core.best_of_n_kl(n), np.log(n) - (n - 1) / n, places=6)


if __name__ == "__main__":
  absltest.main()
