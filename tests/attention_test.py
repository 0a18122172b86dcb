"""`model.attention_impl`: the cuDNN path's inputs give today's attention, and the choice.

cuDNN flash attention cannot run on CPU, so what is checked here is the maths of what it is
handed (`layers.self_attention(kernel="cudnn-inputs")`: our mask as an additive bias plus
`is_causal`, run by XLA) against the XLA path with our boolean mask, on the masks the model
builds: left padding, right padding, packed segments, with grouped-query heads.
"""

from __future__ import annotations

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import config as config_lib, layers, transformer
from rlhf_jax.models.heads import PolicyModel

B, T, N, K, H = 3, 8, 4, 2, 16  # N query heads over K key/value heads: GQA


def _masks() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
  """(mask_BxT, segment_ids_BxT or None) per layout the model sees without a KV cache."""
  left = np.ones((B, T), bool)
  left[0, :3], left[1, :1] = False, False  # left-padded prompts (row 2 unpadded)
  both = left.copy()
  both[0, -2:] = False  # prompt left-padded, response right-padded (PPO / SFT rows)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 3, 3, 3, 3], [1] * T])  # packed rows
  return {"left": (left, None), "left_and_right": (both, None), "packed": (seg > 0, seg)}


@jax.jit
def _both_kernels(q, k, v, mask_BxT, seg_BxT):
  """(out, (dq, dk, dv)) of the XLA path and of the cuDNN path's inputs run by XLA."""
  # Unpacked rows: segment ids = the mask gives the same [B, T, S] mask as no segment ids.
  mask_BxTxS = transformer.self_attention_mask(mask_BxT, seg_BxT)

  def run(kernel):
    f = lambda q, k, v: layers.self_attention(q, k, v, mask_BxTxS, kernel)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(jnp.ones_like(out))
  return run("xla"), run("cudnn-inputs")


def _qkv(dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (2 * jax.random.normal(ks[0], (B, T, N, H), dtype),
          2 * jax.random.normal(ks[1], (B, T, K, H), dtype),
          jax.random.normal(ks[2], (B, T, K, H), dtype))


class CudnnInputsTest(parameterized.TestCase):

  @parameterized.parameters("float32", "bfloat16")
  def test_bias_and_causal_equal_boolean_mask(self, dtype):
    q, k, v = _qkv(jnp.dtype(dtype))
    for layout, (mask_BxT, seg_BxT) in _masks().items():  # one compiled program for all
      seg_BxT = mask_BxT.astype(np.int32) if seg_BxT is None else seg_BxT
      (want, want_grads), (got, got_grads) = _both_kernels(q, k, v, mask_BxT, seg_BxT)
      # Every row, pad queries included (they see their own slot in both).
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                    err_msg=layout)
      for g, w, name in zip(got_grads, want_grads, "qkv"):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-6, atol=1e-6, err_msg=f"{layout} d{name}")

  def test_mask_bias_values(self):
    mask = jnp.array([[[True, False]]])
    self.assertEqual(layers.mask_bias(mask, jnp.bfloat16).tolist(), [[[0.0, -2.0**41]]])
    self.assertEqual(layers.mask_bias(mask, jnp.float16).tolist(), [[[0.0, -2.0**15]]])


class ChoiceTest(absltest.TestCase):

  def test_cpu_picks_xla_for_auto_and_refuses_cudnn(self):
    self.assertEqual(layers.attention_kernel("xla", jnp.bfloat16, 64, T), "xla")
    self.assertEqual(layers.attention_kernel("auto", jnp.bfloat16, 64, T), "xla")
    with self.assertRaisesRegex(ValueError, r"^model.attention_impl='cudnn': it needs an NVIDIA "
                                r"GPU and the backend is 'cpu'; use attention_impl='auto'"):
      layers.attention_kernel("cudnn", jnp.bfloat16, 64, T)

  def test_model_auto_is_the_xla_program_and_cudnn_fails_at_trace(self):
    cfg = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
               mlp_dim=48, dtype="bfloat16")
    tokens, mask = jnp.ones((2, T), jnp.int32), jnp.asarray(_masks()["left"][0][:2])

    def forward_jaxpr(impl):  # traced from abstract parameters: nothing is computed
      cfg_ = config_lib.TransformerConfig(**cfg, attention_impl=impl)
      graphdef, state = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg_, nnx.Rngs(0))))
      return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, mask)[0])(state))

    self.assertEqual(forward_jaxpr("auto"), forward_jaxpr("xla"))
    with self.assertRaisesRegex(ValueError, "attention_impl='cudnn': it needs an NVIDIA GPU"):
      forward_jaxpr("cudnn")

  def test_config_names_the_key(self):
    with self.assertRaisesRegex(ValueError, r"`model.attention_impl` is 'flash'; choose one of"):
      config_lib.TransformerConfig(attention_impl="flash")
    with self.assertRaisesRegex(ValueError, r"attention_impl='cudnn'` needs `model.dtype` "
                                r"bfloat16 or float16 \(got 'float32'\)"):
      config_lib.TransformerConfig(attention_impl="cudnn")


if __name__ == "__main__":
  absltest.main()
