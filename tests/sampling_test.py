"""Tests of the jitted KV-cache sampler and its logit filters.

Every check compares the sampler with something it does not share code with: a plain-numpy
top-k / nucleus filter, and the policy's full forward (no KV cache) over the prompt plus
what was generated. The model is tiny, with an untied LM head of large std so next-token
distributions are far from uniform (a wrong temperature or filter shows in the statistics).
"""

from __future__ import annotations

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import sampling
from rlhf_jax.models import config as config_lib
from rlhf_jax.models import heads

import testing  # tests/testing.py

V = 48  # vocab size
PAD = 0
NO_EOS = V  # An id the model can never emit: EOS effectively disabled.


def tiny_cfg(**overrides) -> config_lib.TransformerConfig:
  base = dict(vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
              mlp_dim=64, init_std=0.1, rope_theta=500.0, rms_norm_eps=1e-6,
              tie_embeddings=False)
  base.update(overrides)
  return config_lib.TransformerConfig(**base)


CFG = tiny_cfg()


@functools.lru_cache(maxsize=None)
def graphdef_of(cfg) -> nnx.GraphDef:
  return nnx.split(nnx.eval_shape(lambda: heads.PolicyModel(cfg, nnx.Rngs(0))))[0]


def random_params(cfg, seed: int, head_std: float = 0.5) -> nnx.State:
  """PolicyModel params set from numpy (`testing.random_state`): N(0, 0.1) matrices,
  1 + 0.2 N(0, 1) norm scales and an N(0, head_std) LM head (logits spread over a few units:
  peaked but not one-hot)."""
  _, state, _ = testing.random_state(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed,
                                     std=0.1, stds={"lm_head_DxV": head_std})
  return state


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, mask):
  return nnx.merge(graphdef, params)(tokens, mask)[0]


def full_logits(params, tokens, mask, cfg=CFG) -> np.ndarray:
  """Logits [B, T, V] (float64) of a full forward without a KV cache."""
  out = _logits(graphdef_of(cfg), params, jnp.asarray(tokens, jnp.int32),
                jnp.asarray(mask, jnp.int32))
  return np.asarray(out, np.float64)


def left_padded_prompts(rng: np.random.Generator, lengths, total_len: int):
  """Tokens [B, T] (pads hold random garbage, not PAD) and a left-padded mask."""
  return testing.left_padded_batch(rng, lengths, total_len, V)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(np_log_softmax(x))


def np_keep(logits: np.ndarray, top_k: int, top_p: float, slack: float = 0.0) -> np.ndarray:
  """Plain-numpy top-k then nucleus filter: bool [..., V], True = may be sampled.

  top-k: the k largest logits. top-p: over the top-k survivors, renormalised and sorted by
  decreasing probability, keep the shortest prefix whose mass reaches top_p (a token is kept
  iff the mass strictly before it is < top_p). `slack` widens both tests, for comparisons
  against logits recomputed in float32 by another code path.
  """
  x = np.asarray(logits, np.float64)
  keep = np.ones(x.shape, bool)
  if top_k:
    kth = -np.sort(-x, axis=-1)[..., top_k - 1:top_k]
    keep &= x >= kth - slack
  if top_p < 1.0:
    xm = np.where(keep, x, -np.inf)
    order = np.argsort(-xm, axis=-1, kind="stable")
    probs = np_softmax(np.take_along_axis(xm, order, axis=-1))
    before = np.cumsum(probs, axis=-1) - probs
    nucleus = np.zeros_like(keep)
    np.put_along_axis(nucleus, order, before < top_p + slack, axis=-1)
    keep &= nucleus
  return keep


def chi2_stat(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
  """Pearson chi-square of counts [G, V] against probabilities [G, V] (one multinomial per
  group); cells expected below 5 are pooled per group. Returns (statistic, dof)."""
  stat, dof = 0.0, 0
  for c, q in zip(counts, expected_probs):
    e = c.sum() * q
    big = e >= 5
    obs = np.append(c[big], c[~big].sum())
    exp = np.append(e[big], e[~big].sum())
    if exp[-1] == 0:
      obs, exp = obs[:-1], exp[:-1]
    stat += float(np.sum((obs - exp) ** 2 / exp))
    dof += len(exp) - 1
  return stat, dof


def chi2_threshold(dof: int, z: float = 4.75) -> float:
  """Upper quantile of chi2(dof) (Wilson-Hilferty); z = 4.75 is a tail of about 1e-6."""
  a = 2.0 / (9.0 * dof)
  return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def greedy_reference(params, prompt, prompt_mask, n: int, eos_id: int, min_new: int = 0):
  """Greedy decoding by repeated full forwards (no KV cache) over the growing sequence.

  The sequence lives in a [B, P + n] buffer whose not-yet-generated slots are masked pads
  (causal attention: they cannot influence earlier positions). Returns tokens, mask,
  logprobs (log_softmax of the logits, temperature 1) and the smallest top-1/top-2 logit
  gap over live steps (argmax is only well defined with a margin over float32 noise).
  """
  b, p = prompt.shape
  rng = np.random.default_rng(123)
  buf = np.concatenate([prompt, rng.integers(0, V, size=(b, n))], axis=1).astype(np.int32)
  mask = np.concatenate([prompt_mask, np.zeros((b, n), np.int32)], axis=1)
  tokens, live_mask, logprobs = [], [], []
  done = np.zeros(b, bool)
  min_gap = np.inf
  for i in range(n):
    logits = full_logits(params, buf, mask)[:, p - 1 + i]
    if i < min_new:
      logits[:, eos_id] = -np.inf
    live = ~done
    top2 = -np.sort(-logits, axis=-1)[:, :2]
    min_gap = min(min_gap, float((top2[:, 0] - top2[:, 1])[live].min(initial=np.inf)))
    tok = np.where(live, logits.argmax(-1), PAD)
    lp = np.where(live, np.take_along_axis(np_log_softmax(logits), tok[:, None], -1)[:, 0], 0.0)
    buf[:, p + i] = tok
    mask[:, p + i] = live
    done |= live & (tok == eos_id)
    tokens.append(tok)
    live_mask.append(live)
    logprobs.append(lp)
  return (np.stack(tokens, 1), np.stack(live_mask, 1).astype(np.int32), np.stack(logprobs, 1),
          min_gap)


def sample(sampling_cfg: sampling.SamplingConfig, params, prompt, prompt_mask, seed: int,
           eos_id: int = NO_EOS, pad_id: int = PAD, cfg=CFG) -> dict[str, np.ndarray]:
  sampler = sampling.make_sampler(graphdef_of(cfg), sampling_cfg, eos_id=eos_id, pad_id=pad_id)
  out = sampler(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map(np.asarray, out)


_filter_jit = jax.jit(sampling.filter_logits, static_argnums=(1, 2))


class SamplingTest(parameterized.TestCase):

  def assert_eos_structure(self, out, eos_id, pad_id=PAD):
    """EOS has mask 1; every later slot is pad with mask 0 and logprob 0; rows that never
    emit EOS are all real. Returns (rows that stopped, rows that did not)."""
    tokens, mask, logprobs = out["tokens"], out["mask"], out["logprobs"]
    n = tokens.shape[1]
    stopped, running = [], []
    for row in range(tokens.shape[0]):
      hits = np.flatnonzero(tokens[row] == eos_id)
      if hits.size and mask[row, hits[0]]:
        j = hits[0]
        np.testing.assert_array_equal(mask[row, :j + 1], 1, err_msg=f"row {row}")
        np.testing.assert_array_equal(mask[row, j + 1:], 0, err_msg=f"row {row}")
        np.testing.assert_array_equal(tokens[row, j + 1:], pad_id, err_msg=f"row {row}")
        np.testing.assert_array_equal(logprobs[row, j + 1:], 0.0, err_msg=f"row {row}")
        self.assertTrue(np.all(logprobs[row, :j + 1] < 0), f"row {row}")
        (stopped if j + 1 < n else running).append(row)
      else:
        np.testing.assert_array_equal(mask[row], 1, err_msg=f"row {row} never emitted EOS")
        running.append(row)
    return stopped, running

  # ------------------------------------------------------------------ filter_logits

  @parameterized.named_parameters(
      ("k1", 1, 1.0),
      ("k5", 5, 1.0),
      ("k20", 20, 1.0),
      ("p_tiny", 0, 1e-6),
      ("p05", 0, 0.5),
      ("p09", 0, 0.9),
      ("p099", 0, 0.99),
      ("k5_p08", 5, 0.8),
      ("k20_p05", 20, 0.5),
  )
  def test_filter_logits_matches_numpy(self, top_k, top_p):
    rng = np.random.default_rng(top_k * 1000 + int(top_p * 1000))
    b = 64
    # Ties-free logits with per-row spread from flat (0.3) to peaked (4).
    logits = (rng.standard_normal((b, V)) * rng.uniform(0.3, 4.0, (b, 1))).astype(np.float32)
    out = np.asarray(_filter_jit(jnp.asarray(logits), top_k, top_p))
    keep = np_keep(logits, top_k, top_p)

    np.testing.assert_array_equal(np.isfinite(out), keep)
    np.testing.assert_array_equal(out[keep], logits[keep])  # Survivors are untouched.
    np.testing.assert_array_equal(out[~keep], -np.inf)
    self.assertTrue(np.all(keep[np.arange(b), logits.argmax(-1)]), "argmax dropped")
    self.assertTrue(np.any(~keep), "filter removed nothing: vacuous case")
    kept = keep.sum(-1)
    if top_k:
      self.assertTrue(np.all(kept <= top_k))
      if top_p == 1.0:
        np.testing.assert_array_equal(kept, top_k)
    if top_p < 1.0:
      # The kept set, independently of the reference: its renormalised (after top-k) mass
      # reaches top_p, and dropping its least likely member would fall below top_p.
      pool = np_keep(logits, top_k, 1.0)
      probs = np_softmax(np.where(pool, logits.astype(np.float64), -np.inf))
      kept_probs = np.where(np.isfinite(out), probs, 0.0)
      mass = kept_probs.sum(-1)
      smallest = np.where(np.isfinite(out), probs, np.inf).min(-1)
      self.assertTrue(np.all(mass >= top_p - 1e-6), mass.min())
      self.assertTrue(np.all(mass - smallest < top_p), (mass - smallest).max())
      if top_p > 0.01:
        self.assertGreater(len(set(kept.tolist())), 1)  # Nucleus size adapts per row.

  def test_filter_logits_identity_and_ties(self):
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((16, V))).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_filter_jit(jnp.asarray(logits), 0, 1.0)), logits)
    np.testing.assert_array_equal(np.asarray(_filter_jit(jnp.asarray(logits), V, 1.0)), logits)
    # Tied maxima with the tightest filters: the most likely token(s) still survive, and
    # nothing less likely does.
    tied = logits.copy()
    tied[:, 3] = tied[:, 7] = tied.max(-1) + 1.0
    for k, p in ((1, 1.0), (0, 1e-6), (1, 1e-6)):
      out = np.asarray(_filter_jit(jnp.asarray(tied), k, p))
      self.assertTrue(np.all(np.isfinite(out[:, 3]) | np.isfinite(out[:, 7])), (k, p))
      others = np.delete(out, [3, 7], axis=1)
      np.testing.assert_array_equal(others, -np.inf, err_msg=f"k={k} p={p}")

  # ------------------------------------------------------------------ categorical draws

  def test_first_argmax_is_numpy_argmax_with_ties(self):
    rng = np.random.default_rng(0)
    # Few distinct values, so most rows have their maximum several times; -inf entries too.
    x = rng.integers(0, 4, (256, V)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = -np.inf
    x[0] = -np.inf
    x[0, [5, 9]] = 1.0
    got = np.asarray(jax.jit(sampling.first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))  # numpy: the first maximum
    self.assertEqual(got[0], 5)
    self.assertGreater(np.mean((x == x.max(-1, keepdims=True)).sum(-1) > 1), 0.9)

  def test_categorical_is_numpy_inverse_cdf(self):
    """The draw is the inverse CDF of the softmax at u = 1 - uniform(key), computed here in
    float64 numpy, also with filtered (-inf) logits; the distribution itself is tested against
    exact probabilities in test_sampling_statistics."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((64, V)) * rng.uniform(0.3, 4.0, (64, 1))).astype(np.float32)
    filtered = np.asarray(_filter_jit(jnp.asarray(logits), 5, 0.9))
    ours = jax.jit(jax.vmap(sampling.categorical, in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(3), 200)
    u = 1.0 - np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (64, 1)))(keys), np.float64)
    for x in (logits, filtered):
      got = np.asarray(ours(keys, x))
      cdf = np.cumsum(np_softmax(x.astype(np.float64)), axis=-1)
      want = (cdf[None] < u * cdf[None, :, -1:]).sum(-1)
      # float32 vs float64 sums may disagree when u falls within ~1e-6 of a CDF step.
      self.assertGreater(np.mean(got == want), 0.999)
      self.assertGreater(np.mean(got != got[:1]), 0.3)  # the keys drew different tokens
      self.assertTrue(np.all(np.isfinite(np.take_along_axis(x, got.T, axis=1))))

  # ------------------------------------------------------------------ sampling statistics

  @parameterized.named_parameters(
      ("temperature_07", 0.7, 0, 1.0),
      ("top_k", 1.3, 6, 1.0),
      ("top_p", 1.0, 0, 0.75),
  )
  def test_sampling_statistics(self, temperature, top_k, top_p):
    params = random_params(CFG, seed=1)
    rng = np.random.default_rng(1)
    p, n, reps = 6, 3, 1024
    lengths = [6, 4, 2, 5]
    g = len(lengths)
    prompts, pmask = left_padded_prompts(rng, lengths, p)
    # Each prompt repeated `reps` times (row r is prompt r % g).
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=temperature,
                                         top_k=top_k, top_p=top_p),
                 params, np.tile(prompts, (reps, 1)), np.tile(pmask, (reps, 1)), seed=7)
    tokens = out["tokens"]
    self.assertEqual(tokens.shape, (g * reps, n))
    np.testing.assert_array_equal(out["mask"], 1)  # EOS is disabled.

    # First token: empirical frequencies vs the filtered softmax(logits / T) of a full
    # forward over the prompt.
    scaled = full_logits(params, prompts, pmask)[:, -1] / temperature
    keep = np_keep(scaled, top_k, top_p)
    want = np_softmax(np.where(keep, scaled, -np.inf))
    counts = np.stack([np.bincount(tokens[r::g, 0], minlength=V) for r in range(g)])
    self.assertEqual(counts[~keep].sum(), 0, "sampled a filtered-out first token")
    stat, dof = chi2_stat(counts, want)
    self.assertLess(stat, chi2_threshold(dof), f"chi2 {stat:.1f} with {dof} dof")
    freq = counts / reps
    sigma = np.sqrt(want * (1 - want) / reps)
    self.assertLess(np.max(np.abs(freq - want) - 5 * sigma), 1e-3)
    # The test has power: a wrong temperature or a missing filter is rejected.
    wrong_temperature = np_softmax(np.where(keep, scaled * temperature / 1.25, -np.inf))
    wrong = wrong_temperature if keep.all() else np_softmax(scaled)
    wrong_stat, wrong_dof = chi2_stat(counts, wrong)
    self.assertGreater(wrong_stat, chi2_threshold(wrong_dof))

    # Every step: each emitted token lies in the top-k set / nucleus of the full-forward
    # logits at its position (with a little slack for float32 differences at the boundary).
    seq = np.concatenate([np.tile(prompts, (reps, 1)), tokens], axis=1)
    seq_mask = np.concatenate([np.tile(pmask, (reps, 1)), out["mask"]], axis=1)
    step_logits = full_logits(params, seq, seq_mask)[:, p - 1:p - 1 + n] / temperature
    allowed = np_keep(step_logits, top_k, top_p, slack=1e-4)
    emitted_ok = np.take_along_axis(allowed, tokens[..., None], -1)[..., 0]
    self.assertTrue(np.all(emitted_ok), f"{np.sum(~emitted_ok)} tokens outside the filter")
    # Later steps: given the prompt and the tokens so far, the next token follows the
    # filtered softmax of the full-forward logits (catches e.g. a key reused across steps).
    for i in range(1, n):
      contexts = {}
      for row, ctx in enumerate(tokens[:, :i].tolist()):
        contexts.setdefault((row % g, *ctx), []).append(row)
      groups = [rows for rows in contexts.values() if len(rows) >= 100]
      self.assertGreater(sum(map(len, groups)), 1000, f"step {i}: too few repeated contexts")
      counts = np.stack([np.bincount(tokens[rows, i], minlength=V) for rows in groups])
      first = [rows[0] for rows in groups]
      want = np_softmax(np.where(np_keep(step_logits[first, i], top_k, top_p),
                                 step_logits[first, i], -np.inf))
      stat, dof = chi2_stat(counts, want)
      self.assertLess(stat, chi2_threshold(dof), f"step {i}: chi2 {stat:.1f} with {dof} dof")
    # Log-probs are those of the full softmax(logits / T), before top-k / top-p filtering.
    want_logp = np.take_along_axis(np_log_softmax(step_logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], want_logp, rtol=0, atol=1e-4)
    if top_k or top_p < 1:
      # Unfiltered sampling would have emitted many tokens outside the set.
      outside_mass = np.sum(np_softmax(step_logits) * ~np_keep(step_logits, top_k, top_p))
      self.assertGreater(outside_mass, 100)

  # ------------------------------------------------------------------ greedy

  def test_greedy_matches_argmax_loop(self):
    params = random_params(CFG, seed=2)
    rng = np.random.default_rng(2)
    prompts, pmask = left_padded_prompts(rng, [7, 3, 1, 5], 7)
    n = 6
    want_tokens, _, want_logprobs, gap = greedy_reference(params, prompts, pmask, n, NO_EOS)
    self.assertGreater(gap, 1e-3)
    self.assertGreater(len(np.unique(want_tokens)), n)  # Not a constant output.
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0),
                 params, prompts, pmask, seed=0)
    np.testing.assert_array_equal(out["tokens"], want_tokens)
    np.testing.assert_array_equal(out["mask"], 1)
    # Greedy log-probs are those of softmax(logits) (temperature 1).
    np.testing.assert_allclose(out["logprobs"], want_logprobs, rtol=0, atol=1e-4)
    self.assertLess(want_logprobs.max(), -1e-3)  # Not a one-hot distribution.

  # ------------------------------------------------------------------ log-probs

  @parameterized.named_parameters(("t07", 0.7), ("t10", 1.0))
  def test_logprobs_match_full_forward(self, temperature):
    params = random_params(CFG, seed=3)
    rng = np.random.default_rng(3)
    b, p, n = 32, 6, 8
    prompts, pmask = left_padded_prompts(rng, rng.integers(1, p + 1, size=b), p)
    # EOS = the likeliest first token of row 0, so some rows stop early and others do not.
    eos_id = int(full_logits(params, prompts[:1], pmask[:1])[0, -1].argmax())
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=temperature),
                 params, prompts, pmask, seed=11, eos_id=eos_id)
    stopped, running = self.assert_eos_structure(out, eos_id)
    self.assertNotEmpty(stopped)
    self.assertNotEmpty(running)

    seq = np.concatenate([prompts, out["tokens"]], axis=1)
    seq_mask = np.concatenate([pmask, out["mask"]], axis=1)
    logp = np_log_softmax(full_logits(params, seq, seq_mask)[:, p - 1:p - 1 + n] / temperature)
    want = np.take_along_axis(logp, out["tokens"][..., None], -1)[..., 0]
    want = np.where(out["mask"] == 1, want, 0.0)
    np.testing.assert_allclose(out["logprobs"], want, rtol=0, atol=1e-4)
    # Sensitive: log-probs at temperature 1.25x off would differ by far more than atol.
    other = np_log_softmax(full_logits(params, seq, seq_mask)[:, p - 1:p - 1 + n]
                           / (1.25 * temperature))
    other = np.take_along_axis(other, out["tokens"][..., None], -1)[..., 0]
    self.assertGreater(np.max(np.abs(np.where(out["mask"] == 1, other, 0.0) - want)), 0.05)

  # ------------------------------------------------------------------ EOS, min_new_tokens

  def test_eos_greedy(self):
    params = random_params(CFG, seed=2)
    rng = np.random.default_rng(2)
    prompts, pmask = left_padded_prompts(rng, [7, 3, 1, 5], 7)
    n = 6
    free, _, _, _ = greedy_reference(params, prompts, pmask, n, NO_EOS)
    eos_id = int(free[1, 2])  # Row 1 stops at (or before) step 2.
    want_tokens, want_mask, want_logprobs, gap = greedy_reference(params, prompts, pmask, n,
                                                                  eos_id)
    self.assertGreater(gap, 1e-3)
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0),
                 params, prompts, pmask, seed=0, eos_id=eos_id, pad_id=PAD)
    stopped, running = self.assert_eos_structure(out, eos_id)
    self.assertIn(1, stopped)
    self.assertNotEmpty(running)
    np.testing.assert_array_equal(out["tokens"], want_tokens)
    np.testing.assert_array_equal(out["mask"], want_mask)
    np.testing.assert_allclose(out["logprobs"], want_logprobs, rtol=0, atol=1e-4)
    # Up to EOS, rows follow the EOS-free trajectory.
    real = want_mask == 1
    np.testing.assert_array_equal(out["tokens"][real], free[real])

  def test_min_new_tokens_greedy(self):
    params = random_params(CFG, seed=2)
    rng = np.random.default_rng(2)
    prompts, pmask = left_padded_prompts(rng, [7, 3, 1, 5], 7)
    n, min_new = 6, 3
    free, _, _, _ = greedy_reference(params, prompts, pmask, n, NO_EOS)
    eos_id = int(free[0, 0])  # The argmax of row 0's very first step.
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0,
                                         min_new_tokens=min_new),
                 params, prompts, pmask, seed=0, eos_id=eos_id)
    self.assertTrue(np.all(out["tokens"][:, :min_new] != eos_id))
    np.testing.assert_array_equal(out["mask"][:, :min_new], 1)
    # Row 0 took its second choice at step 0.
    logits0 = full_logits(params, prompts[:1], pmask[:1])[0, -1]
    self.assertEqual(int(logits0.argmax()), eos_id)
    self.assertEqual(out["tokens"][0, 0], int(np.argsort(-logits0)[1]))
    # The returned log-prob is the policy's own (EOS not banned), as PPO recomputes it.
    logp0 = logits0 - np.log(np.exp(logits0 - logits0.max()).sum()) - logits0.max()
    self.assertAlmostEqual(float(out["logprobs"][0, 0]), float(logp0[out["tokens"][0, 0]]),
                           places=4)
    want_tokens, want_mask, _, gap = greedy_reference(params, prompts, pmask, n, eos_id,
                                                      min_new=min_new)
    self.assertGreater(gap, 1e-3)
    np.testing.assert_array_equal(out["tokens"], want_tokens)
    np.testing.assert_array_equal(out["mask"], want_mask)
    self.assert_eos_structure(out, eos_id)

  def test_min_new_tokens_sampled(self):
    params = random_params(CFG, seed=4)
    rng = np.random.default_rng(4)
    prompt, pmask = left_padded_prompts(rng, [5], 6)
    b, n, min_new, temperature = 256, 6, 2, 0.3
    logits0 = full_logits(params, prompt, pmask)[0, -1] / temperature
    eos_id = int(logits0.argmax())
    self.assertGreater(np_softmax(logits0)[eos_id], 0.5)  # EOS is the likely first token.
    out = sample(sampling.SamplingConfig(max_new_tokens=n, temperature=temperature,
                                         min_new_tokens=min_new),
                 params, np.repeat(prompt, b, 0), np.repeat(pmask, b, 0), seed=5,
                 eos_id=eos_id)
    self.assertTrue(np.all(out["tokens"][:, :min_new] != eos_id))
    np.testing.assert_array_equal(out["mask"][:, :min_new], 1)
    stopped, _ = self.assert_eos_structure(out, eos_id)
    # EOS is allowed (and emitted) from step `min_new` on.
    self.assertNotEmpty(stopped)

  # ------------------------------------------------------------------ determinism, compiles

  def test_deterministic_and_compiled_once(self):
    b, p, n = 8, 6, 8
    rng = np.random.default_rng(6)
    prompts1, pmask1 = left_padded_prompts(rng, rng.integers(1, p + 1, size=b), p)
    prompts2, pmask2 = left_padded_prompts(rng, rng.integers(1, p + 1, size=b), p)
    params1, params2 = random_params(CFG, seed=6), random_params(CFG, seed=7)
    sampler = sampling.make_sampler(
        graphdef_of(CFG), sampling.SamplingConfig(max_new_tokens=n, temperature=1.0, top_k=20),
        eos_id=NO_EOS, pad_id=PAD)

    def run(params, prompts, pmask, seed):
      out = sampler(params, jnp.asarray(prompts), jnp.asarray(pmask), jax.random.PRNGKey(seed))
      return jax.tree_util.tree_map(np.asarray, out)

    a = run(params1, prompts1, pmask1, 0)
    again = run(params1, prompts1, pmask1, 0)
    for k in ("tokens", "mask", "logprobs"):
      np.testing.assert_array_equal(a[k], again[k], err_msg=k)
    other_seed = run(params1, prompts1, pmask1, 1)
    self.assertGreater(np.mean(a["tokens"] != other_seed["tokens"]), 0.3)
    other_params = run(params2, prompts1, pmask1, 0)
    self.assertGreater(np.mean(a["tokens"] != other_params["tokens"]), 0.3)
    other_prompts = run(params1, prompts2, pmask2, 0)
    self.assertGreater(np.mean(a["tokens"] != other_prompts["tokens"]), 0.3)
    run(params2, prompts2, pmask2, 3)
    self.assertEqual(sampler._cache_size(), 1)  # pylint: disable=protected-access

  # ------------------------------------------------------------------ config validation

  @parameterized.named_parameters(
      ("max_new_tokens_0", dict(max_new_tokens=0)),
      ("max_new_tokens_negative", dict(max_new_tokens=-3)),
      ("top_p_0", dict(top_p=0.0)),
      ("top_p_negative", dict(top_p=-0.5)),
      ("top_p_above_1", dict(top_p=1.5)),
      ("temperature_negative", dict(temperature=-0.1)),
      ("top_k_negative", dict(top_k=-1)),
  )
  def test_config_rejects_bad_values(self, kwargs):
    with self.assertRaises(ValueError):
      sampling.SamplingConfig(**kwargs)

  def test_config_accepts_edge_values(self):
    sampling.SamplingConfig()
    sampling.SamplingConfig(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0)
    sampling.SamplingConfig(top_p=1e-6, top_k=1, min_new_tokens=5)


if __name__ == "__main__":
  absltest.main()
