"""The chunked LM head + cross-entropy against a float64 numpy reference, values and grads."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from rlhf_jax.models import PolicyModel, TransformerConfig, lm_loss
from rlhf_jax.stages import sft


def np_reference(h, w, targets, weights):
  """(weighted CE sum, correct count, dCE/dh, dCE/dw) in float64, written out by hand."""
  h, w = h.astype(np.float64), w.astype(np.float64)
  logits = h @ w
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  ce = -(picked * weights).sum()
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = ((target_logit >= logits.max(-1)) * weights).sum()
  onehot = np.eye(w.shape[1])[targets]
  dlogits = (np.exp(logp) - onehot) * weights[..., None]
  return ce, correct, dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)


class ChunkedCeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("divisible", 12, 4), ("padded", 11, 4), ("one_chunk", 7, 16), ("chunk_of_one", 5, 1))
  def test_matches_numpy(self, t, chunk):
    rng = np.random.default_rng(t * 10 + chunk)
    b, d, v = 3, 8, 37
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    weights = (rng.uniform(size=(b, t)) > 0.3).astype(np.float32)
    targets[0, 0] = np.argmax(h[0, 0] @ w)  # at least one correct prediction
    weights[0, 0] = 1.0
    ce, correct, dh, dw = np_reference(h, w, targets, weights)

    def loss(h, w):
      ce, correct = lm_loss.chunked_token_ce(h, w, targets, weights, chunk)
      return 2.0 * ce, correct  # a cotangent other than 1 must scale the gradient

    (got_ce, got_correct), (gh, gw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        jnp.asarray(h), jnp.asarray(w))
    np.testing.assert_allclose(float(got_ce), 2 * ce, rtol=1e-5)
    self.assertEqual(float(got_correct), correct)
    self.assertGreater(correct, 0)
    np.testing.assert_allclose(np.asarray(gh), 2 * dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), 2 * dw, rtol=1e-4, atol=1e-5)
    # Without a gradient (evaluation) the same values.
    ev_ce, ev_correct = jax.jit(lm_loss.chunked_token_ce, static_argnums=4)(
        h, w, targets, weights, chunk)
    np.testing.assert_allclose(float(ev_ce), ce, rtol=1e-5)
    self.assertEqual(float(ev_correct), correct)

  @parameterized.parameters(False, True)
  def test_sft_loss_chunked_equals_whole(self, tied):
    """`model.ce_chunk_len` changes nothing but memory: loss, accuracy and gradients (also
    through a tied embedding) equal the whole-sequence head's."""
    rng = np.random.default_rng(int(tied))
    tokens = rng.integers(3, 97, size=(3, 10)).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones_like(tokens),
             "loss_mask": (rng.uniform(size=tokens.shape) > 0.4).astype(np.int32)}
    out = []
    for chunk in (0, 4):
      cfg = TransformerConfig(vocab_size=97, d_model=16, num_layers=1, num_heads=2,
                              num_kv_heads=2, mlp_dim=24, tie_embeddings=tied,
                              ce_chunk_len=chunk, init_std=0.5)
      graphdef, params = nnx.split(PolicyModel(cfg, nnx.Rngs(params=0)))
      out.append(jax.jit(jax.value_and_grad(
          lambda p: sft.sft_loss(nnx.merge(graphdef, p), batch), has_aux=True))(params))
    ((l0, m0), g0), ((l1, m1), g1) = out
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(float(m1["token_accuracy"]), float(m0["token_accuracy"]))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
