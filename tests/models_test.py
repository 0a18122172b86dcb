"""Tests of the LLaMA-style trunk and its policy / value / reward heads.

Every numerical test compares against something independent of the code under test: the
same model on a different input layout (padding, KV cache, jit), a plain-numpy float64
forward written here from the parameter pytree, or Hugging Face's `LlamaForCausalLM`.
Models are tiny and use a large init std (0.1) and random norm scales so attention is far
from uniform and every parameter matters to the output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import config as config_lib
from rlhf_jax.models import heads
from rlhf_jax.models import hf_import
from rlhf_jax.models import transformer

import testing  # tests/testing.py

TransformerConfig = config_lib.TransformerConfig


def tiny_cfg(**overrides) -> TransformerConfig:
  base = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
              mlp_dim=96, init_std=0.1, rope_theta=500.0, rms_norm_eps=1e-6)
  base.update(overrides)
  return TransformerConfig(**base)


def random_model(kind: str, cfg: TransformerConfig, seed: int = 0) -> nnx.Module:
  """A model with N(0, 0.1) matrices and 1 + 0.2 N(0, 1) norm scales, set from numpy
  (`testing.random_state`)."""
  graphdef, state, _ = testing.random_state(
      lambda: heads.MODEL_KINDS[kind](cfg, nnx.Rngs(0)), seed, std=0.1)
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jit_call(graphdef, state, method, *args):
  model = nnx.merge(graphdef, state)
  return (model if method == "__call__" else getattr(model, method))(*args)


def call(model: nnx.Module, *args, method: str = "__call__"):
  """model.method(*args) under jit (eager dispatch compiles every op: far slower on CPU)."""
  graphdef, state = nnx.split(model)
  return _jit_call(graphdef, state, method, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_init(kind, cfg, key):
  return nnx.state(heads.build(kind, cfg, seed=key))


def init_model(kind: str, cfg: TransformerConfig, seed: int) -> nnx.Module:
  """`heads.build(kind, cfg, seed)`, run under jit: one compile instead of one per op."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: heads.build(kind, cfg, seed=0)))
  return nnx.merge(graphdef, _jit_init(kind, cfg, jax.random.key(seed)))


def params_numpy(model: nnx.Module) -> dict:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), pure)


# --------------------------------------------------------------------------------------------
# Independent plain-numpy (float64) LLaMA forward, written from the HF modelling code.
# --------------------------------------------------------------------------------------------


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x_btnh, pos_bt, theta):
  h = x_btnh.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  freqs = pos_bt[..., None].astype(np.float64) * inv_freq  # [B, T, H/2]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = np.cos(emb), np.sin(emb)
  x1, x2 = x_btnh[..., : h // 2], x_btnh[..., h // 2:]
  rotate_half = np.concatenate([-x2, x1], axis=-1)
  return x_btnh * cos + rotate_half * sin


def np_policy_forward(p: dict, cfg: TransformerConfig, tokens, mask):
  """Logits [B, T, V] of a PolicyModel in float64 from its pure-dict params."""
  tokens = np.asarray(tokens)
  mask = np.asarray(mask).astype(bool)
  b, t = tokens.shape
  n, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  # HF generate(): position_ids = cumsum(mask) - 1 (pads: don't care).
  pos = np.maximum(np.cumsum(mask.astype(np.int64), axis=-1) - 1, 0)
  trunk = p["trunk"]
  x = trunk["embed_VxD"][tokens]  # [B, T, D]
  allowed = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :]  # [B, Tq, Tk]
  for i in range(cfg.num_layers):
    blk = trunk["blocks"][i]
    h = np_rms_norm(x, blk["attn_norm"]["scale"], cfg.rms_norm_eps)
    # HF layout: q_proj.weight is [N*H, D]; our kernel is its transpose reshaped.
    wq = blk["attn"]["q_DxNxH"].reshape(cfg.d_model, n * hd)
    wk = blk["attn"]["k_DxKxH"].reshape(cfg.d_model, k * hd)
    wv = blk["attn"]["v_DxKxH"].reshape(cfg.d_model, k * hd)
    wo = blk["attn"]["o_NxHxD"].reshape(n * hd, cfg.d_model)
    q = (h @ wq).reshape(b, t, n, hd)
    kk = (h @ wk).reshape(b, t, k, hd)
    v = (h @ wv).reshape(b, t, k, hd)
    q = np_rope(q, pos, cfg.rope_theta)
    kk = np_rope(kk, pos, cfg.rope_theta)
    # HF repeat_kv: query head j uses kv head j // (N // K).
    rep = n // k
    kk = np.repeat(kk, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    scores = np.einsum("bqnh,bknh->bnqk", q, kk) / math.sqrt(hd)
    scores = np.where(allowed[:, None], scores, -1e30)
    scores = scores - scores.max(axis=-1, keepdims=True)
    w = np.exp(scores)
    w = w / w.sum(axis=-1, keepdims=True)
    attn = np.einsum("bnqk,bknh->bqnh", w, v).reshape(b, t, n * hd)
    x = x + attn @ wo
    h = np_rms_norm(x, blk["mlp_norm"]["scale"], cfg.rms_norm_eps)
    gate = h @ blk["mlp"]["gate_DxF"]
    up = h @ blk["mlp"]["up_DxF"]
    silu = gate / (1.0 + np.exp(-gate))
    x = x + (silu * up) @ blk["mlp"]["down_FxD"]
  x = np_rms_norm(x, trunk["final_norm"]["scale"], cfg.rms_norm_eps)
  w_out = trunk["embed_VxD"].T if cfg.tie_embeddings else p["lm_head_DxV"]
  return x @ w_out


def hf_and_imported_logits(hf, tokens, mask):
  """(Hugging Face logits, imported config, our logits) for a padded batch: `hf` is run with
  mask-derived position ids, saved with `save_pretrained`, read back by `load_hf_llama`."""
  import torch  # pylint: disable=g-import-not-at-top

  position_ids = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long),
              position_ids=torch.tensor(position_ids, dtype=torch.long)).logits.numpy()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    cfg, state = hf_import.load_hf_llama(d)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: heads.PolicyModel(cfg, nnx.Rngs(0))))
  got, _ = call(nnx.merge(graphdef, state), tokens, mask)
  return want, cfg, state, np.asarray(got)


class ModelsTest(parameterized.TestCase):

  # ------------------------------------------------------------------ shapes, dtypes, init

  @parameterized.named_parameters(
      ("f32", "float32", "float32"),
      ("bf16_compute", "bfloat16", "float32"),
      ("bf16_params", "float32", "bfloat16"),
      ("bf16_both", "bfloat16", "bfloat16"),
  )
  def test_policy_shapes_and_dtypes(self, dtype, param_dtype):
    cfg = tiny_cfg(dtype=dtype, param_dtype=param_dtype)
    b, t = 3, 7
    rng = np.random.default_rng(0)
    tokens, mask = testing.left_padded_batch(rng, [7, 4, 1], t, cfg.vocab_size)

    # The real initialiser, traced abstractly: every parameter has the storage dtype.
    abstract = nnx.eval_shape(lambda: heads.build("policy", cfg, seed=0))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param))
    self.assertLen(leaves, 1 + 9 * cfg.num_layers + 1 + 1)  # embed, blocks, norm, lm head
    for path, leaf in leaves:
      self.assertEqual(leaf.dtype, cfg.jnp_param_dtype, jax.tree_util.keystr(path))

    policy = random_model("policy", cfg)
    logits, cache = call(policy, tokens, mask)
    self.assertIsNone(cache)
    self.assertEqual(logits.shape, (b, t, cfg.vocab_size))
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(np.asarray(logits))))

    # Low precision must approximate the float32 model with the same (upcast) params.
    ref = random_model("policy", tiny_cfg())
    state = nnx.state(policy, nnx.Param)
    nnx.update(ref, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), state))
    ref_logits, _ = call(ref, tokens, mask)
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits) - np.asarray(ref_logits))[real]
    scale = np.abs(np.asarray(ref_logits))[real].max()
    self.assertGreater(scale, 1.0)
    if dtype == "float32":
      # bf16 storage only: compute is float32, so this is exact up to float32 rounding.
      self.assertLess(err.max(), 1e-5)
    else:
      self.assertLess(err.max(), 0.1 * scale)
      self.assertGreater(err.max(), 0.0)  # bf16 compute really happened.

  @parameterized.named_parameters(("f32", "float32"), ("bf16", "bfloat16"))
  def test_value_and_reward_shapes_and_dtypes(self, dtype):
    cfg = tiny_cfg(dtype=dtype, param_dtype=dtype)
    b, t = 3, 7
    rng = np.random.default_rng(0)
    tokens, mask = testing.left_padded_batch(rng, [7, 4, 1], t, cfg.vocab_size)
    value = random_model("value", cfg, seed=1)
    v = call(value, tokens, mask)
    self.assertEqual(v.shape, (b, t))
    self.assertEqual(v.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(np.asarray(v))))
    reward = random_model("reward", cfg, seed=2)
    r = call(reward, tokens, mask)
    self.assertEqual(r.shape, (b,))
    self.assertEqual(r.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(np.asarray(r))))
    for kind in ("value", "reward"):
      abstract = nnx.eval_shape(lambda kind=kind: heads.build(kind, cfg, seed=0))
      for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract.trunk, nnx.Param)):
        self.assertEqual(leaf.dtype, cfg.jnp_param_dtype, jax.tree_util.keystr(path))
      # Scalar heads are float32 whatever `param_dtype` (ScalarHead computes in float32).
      head = abstract.value_head if kind == "value" else abstract.reward_head
      self.assertEqual(head.w_Dx1.dtype, jnp.float32)

  def test_value_head_init_is_zero(self):
    cfg = tiny_cfg()
    value = init_model("value", cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens, mask = testing.left_padded_batch(rng, [6, 3], 6, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(call(value, tokens, mask)), 0.0)
    np.testing.assert_array_equal(np.asarray(value.value_head.w_Dx1[...]), 0.0)
    # The trunk is randomly initialised, not zero (else "output 0" would be trivial): the
    # same network with a non-zero head gives non-zero values.
    nnx.update(value.value_head, nnx.State({"w_Dx1": nnx.Param(jnp.ones((cfg.d_model, 1)))}))
    self.assertGreater(float(jnp.abs(call(value, tokens, mask)).max()), 0.1)

  def test_reward_head_init_std(self):
    d = 256
    cfg = tiny_cfg(d_model=d, num_layers=1, num_heads=4, num_kv_heads=4, mlp_dim=64)
    expected = 1.0 / math.sqrt(d + 1)
    stds = []
    for seed in range(3):
      rm = init_model("reward", cfg, seed=seed)
      w = np.asarray(rm.reward_head.w_Dx1[...]).ravel()
      self.assertEqual(w.shape, (d,))
      # Mean within ~4 standard errors of 0.
      self.assertLess(abs(w.mean()), 4 * expected / math.sqrt(d))
      stds.append(w.std())
      np.testing.assert_array_equal(np.asarray(rm.reward_head.b_1[...]), 0.0)
    # Each estimate has relative std error ~1/sqrt(2d) = 4.4%; the mean of 3 ~2.6%.
    # 12% is ~4.5 standard errors, yet excludes the likely mistakes: `init_std` (0.1 here),
    # 1/d (0.004), 1.0, or a zero init.
    np.testing.assert_allclose(np.mean(stds), expected, rtol=0.12)

  # ------------------------------------------------------------------ causality

  def test_causality(self):
    cfg = tiny_cfg(num_kv_heads=2)
    policy = random_model("policy", cfg)
    fwd = lambda tok, m: call(policy, tok, m)[0]
    rng = np.random.default_rng(1)
    t = 10
    tokens, mask = testing.left_padded_batch(rng, [10, 7], t, cfg.vocab_size)
    base = np.asarray(fwd(tokens, mask))
    for j in (3, 5, 8, 9):
      changed = tokens.copy()
      changed[:, j] = (changed[:, j] + 1 + rng.integers(0, cfg.vocab_size - 1)) % cfg.vocab_size
      self.assertTrue(np.all(changed[:, j] != tokens[:, j]))
      out = np.asarray(fwd(changed, mask))
      # Every position, pads included: a pad query attends only to itself.
      before = np.broadcast_to((np.arange(t) < j)[None], mask.shape)
      np.testing.assert_allclose(out[before], base[before], rtol=0, atol=1e-6,
                                 err_msg=f"position {j} leaked into earlier positions")
      # Position j itself (a real token in both rows) must change.
      for row in range(2):
        self.assertTrue(mask[row, j])
        self.assertGreater(np.abs(out[row, j] - base[row, j]).max(), 1e-3, (row, j))
      # And so must a later real position (information flows forward).
      if j + 1 < t:
        self.assertGreater(np.abs(out[:, j + 1] - base[:, j + 1]).max(), 1e-4)

  # ------------------------------------------------------------------ padding

  def test_left_padding_invariance(self):
    cfg = tiny_cfg(num_kv_heads=2)
    policy = random_model("policy", cfg)
    rng = np.random.default_rng(2)
    lengths = [9, 4, 1]
    t = 9
    tokens, mask = testing.left_padded_batch(rng, lengths, t, cfg.vocab_size)
    batched, _ = call(policy, tokens, mask)
    batched = np.asarray(batched)
    for i, n in enumerate(lengths):
      single, _ = call(policy, tokens[i:i + 1, t - n:], np.ones((1, n), np.int32))
      np.testing.assert_allclose(batched[i, t - n:], np.asarray(single)[0], rtol=0, atol=1e-5,
                                 err_msg=f"row {i} ({t - n} left pads)")
    # Sanity: the pad positions' token ids do matter when they are *not* masked.
    unmasked, _ = call(policy, tokens, np.ones_like(mask))
    self.assertGreater(np.abs(np.asarray(unmasked)[2, -1] - batched[2, -1]).max(), 1e-3)

  def test_reward_padding_invariance(self):
    cfg = tiny_cfg(num_kv_heads=2)
    rm = random_model("reward", cfg, seed=3)
    rng = np.random.default_rng(3)
    n, t = 5, 8
    seqs = rng.integers(0, cfg.vocab_size, size=(2, n)).astype(np.int32)
    ref = np.asarray(call(rm, seqs, np.ones((2, n), np.int32)))
    # The score depends on the sequence (a constant would pass the checks below).
    self.assertGreater(abs(ref[0] - ref[1]), 1e-3)
    # seqs[0] with (left, right) pads; pad slots hold random tokens.
    layouts = ((3, 0), (0, 3), (2, 1), (0, 0))
    tok = rng.integers(0, cfg.vocab_size, size=(len(layouts), t)).astype(np.int32)
    mask = np.zeros((len(layouts), t), np.int32)
    for i, (left, right) in enumerate(layouts):
      tok[i, left:left + n] = seqs[0]
      mask[i, left:left + n] = 1
    mask[3, n:] = 1  # Unpadded row: seqs[0] followed by 3 more real tokens.
    got = np.asarray(call(rm, tok, mask))
    np.testing.assert_allclose(got[:3], ref[0], rtol=0, atol=1e-5, err_msg=str(layouts))
    # The score is the per-token head at the last real token.
    per_tok = np.asarray(call(rm, tok, mask, method="per_token"))
    np.testing.assert_allclose(per_tok[[0, 1, 2, 3], [7, 4, 6, 7]], got, rtol=0, atol=1e-6)
    np.testing.assert_allclose(per_tok[3, n - 1], ref[0], rtol=0, atol=1e-5)

  @parameterized.named_parameters(
      ("dense_gqa", 2, dict()),
      ("moe_last_block", 4, dict(num_experts=4, moe_every=2)),  # 2 layers: block 1 is MoE
      ("moe_inner_block", 4, dict(num_experts=4, moe_every=2, dropless=True), 3),
  )
  def test_reward_last_token_path_matches_full_path(self, num_kv_heads, moe_kw, layers=2):
    """The score runs the last block for the scored token only (`last_only`); it equals the
    per-token head of the full forward at that token, with the same gradient and the same MoE
    auxiliary loss."""
    from rlhf_jax.models import moe  # pylint: disable=g-import-not-at-top
    cfg = tiny_cfg(num_kv_heads=num_kv_heads, num_layers=layers,
                   moe=config_lib.MoEConfig(**moe_kw))
    rm = random_model("reward", cfg, seed=8)
    graphdef, params = nnx.split(rm)
    rng = np.random.default_rng(8)
    tokens, mask = testing.left_padded_batch(rng, [9, 4, 1, 7], 9, cfg.vocab_size)
    mask[3, 7:] = 0  # right-padded too
    w = jnp.asarray(rng.normal(size=4), jnp.float32)
    last = transformer.last_token_index(mask)

    def loss(params, full):
      model = nnx.merge(graphdef, params)
      if full:
        r = model.per_token(tokens, mask)[jnp.arange(4), last]
      else:
        r = model(tokens, mask)
      aux, _ = moe.aux_loss(model)
      return (r * w).sum() + aux, (r, aux)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, (got, got_aux)), g = grad(params, False)
    (_, (want, want_aux)), want_g = grad(params, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    self.assertGreater(np.ptp(np.asarray(want)), 1e-2)
    np.testing.assert_allclose(float(got_aux), float(want_aux), rtol=1e-6)
    self.assertEqual(float(want_aux) > 0, bool(moe_kw))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    h = jax.eval_shape(lambda p: nnx.merge(graphdef, p).trunk(tokens, mask, last_only=True)[0],
                       params)
    self.assertEqual(h.shape, (4, 1, cfg.d_model))

  def test_keep_slice_matches_full_forward(self):
    """`keep` (what PPO uses for the response positions) runs the last block's queries for
    the kept positions only; values and gradients equal the full forward's, sliced."""
    cfg = tiny_cfg(num_kv_heads=2, num_layers=2)
    value = random_model("value", cfg, seed=9)
    graphdef, params = nnx.split(value)
    rng = np.random.default_rng(9)
    tokens, mask = testing.left_padded_batch(rng, [9, 4, 6], 9, cfg.vocab_size)
    keep = slice(-4, -1)
    w = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)

    def loss(params, full):
      model = nnx.merge(graphdef, params)
      v = model(tokens, mask)[:, keep] if full else model(tokens, mask, keep=keep)
      return (v * w).sum(), v

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, got), g = grad(params, False)
    (_, want), want_g = grad(params, True)
    self.assertEqual(got.shape, (3, 3))
    self.assertGreater(np.ptp(np.asarray(want)), 1e-2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


  def test_last_token_index(self):
    masks = np.array([
        [0, 0, 1, 1, 1],  # left padded
        [1, 1, 1, 0, 0],  # right padded
        [1, 1, 1, 1, 1],  # unpadded
        [0, 1, 1, 1, 0],  # both
        [1, 0, 0, 0, 0],  # single token, right padded
        [0, 0, 0, 0, 1],  # single token, left padded
    ], np.int32)
    expected = [4, 2, 4, 3, 0, 4]
    np.testing.assert_array_equal(np.asarray(transformer.last_token_index(masks)), expected)
    np.testing.assert_array_equal(
        np.asarray(transformer.last_token_index(masks.astype(bool))), expected)
    np.testing.assert_array_equal(
        np.asarray(transformer.positions_from_mask(masks))[[0, 1, 2]],
        [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])

  # ------------------------------------------------------------------ KV cache

  def _cache_setup(self, num_kv_heads, seed=4):
    cfg = tiny_cfg(num_kv_heads=num_kv_heads)
    policy = random_model("policy", cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompt_len, gen = 6, 4
    lengths = [6, 4, 1]
    prompt, prompt_mask = testing.left_padded_batch(rng, lengths, prompt_len, cfg.vocab_size)
    cont = rng.integers(0, cfg.vocab_size, size=(len(lengths), gen)).astype(np.int32)
    tokens = np.concatenate([prompt, cont], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(cont)], axis=1)
    full, _ = call(policy, tokens, mask)
    return cfg, policy, prompt_len, gen, lengths, tokens, mask, np.asarray(full)

  @parameterized.named_parameters(("mha", 4), ("gqa", 2), ("mqa", 1))
  def test_cached_decode_matches_full_forward(self, num_kv_heads):
    cfg, policy, p, gen, lengths, tokens, mask, full = self._cache_setup(num_kv_heads)
    b = tokens.shape[0]
    max_len = p + gen + 3  # Spare slots: unfilled slots must stay invisible.
    cache = transformer.init_cache(cfg, b, max_len)
    logits, cache = call(policy, tokens[:, :p], mask[:, :p], cache)
    outs = [np.asarray(logits)]
    self.assertEqual(int(cache.index), p)
    np.testing.assert_array_equal(np.asarray(cache.next_position_B), lengths)
    for i in range(gen):
      step_logits, cache = call(policy, tokens[:, p + i:p + i + 1], mask[:, p + i:p + i + 1],
                                cache)
      self.assertEqual(step_logits.shape, (b, 1, cfg.vocab_size))
      outs.append(np.asarray(step_logits))
    cached = np.concatenate(outs, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], rtol=0, atol=1e-5)
    self.assertEqual(int(cache.index), p + gen)
    np.testing.assert_array_equal(np.asarray(cache.next_position_B), np.array(lengths) + gen)
    expected_key_mask = np.zeros((b, max_len), bool)
    expected_key_mask[:, :p + gen] = real
    np.testing.assert_array_equal(np.asarray(cache.key_mask_BxS), expected_key_mask)
    self.assertEqual(cache.k[0].shape, (b, num_kv_heads, cfg.resolved_head_dim, max_len))
    self.assertEqual(cache.v[0].shape, (b, num_kv_heads, max_len, cfg.resolved_head_dim))

  @parameterized.named_parameters(("gqa", 2), ("mha", 4))
  def test_jitted_cached_decode_with_donated_cache(self, num_kv_heads):
    cfg, policy, p, gen, _, tokens, mask, full = self._cache_setup(num_kv_heads, seed=5)
    graphdef, params = nnx.split(policy)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def step(params, tokens, mask, cache):
      model = nnx.merge(graphdef, params)
      return model(tokens, mask, cache)

    b = tokens.shape[0]
    cache = transformer.init_cache(cfg, b, p + gen)
    logits, cache = step(params, jnp.asarray(tokens[:, :p]), jnp.asarray(mask[:, :p]), cache)
    outs = [np.asarray(logits)]
    for i in range(gen):
      old = cache
      with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" fails.
        logits, cache = step(params, jnp.asarray(tokens[:, p + i:p + i + 1]),
                             jnp.asarray(mask[:, p + i:p + i + 1]), cache)
      outs.append(np.asarray(logits))
      # Donation took effect: the old cache's buffers were reused for the new one.
      for leaf in jax.tree_util.tree_leaves(old):
        self.assertTrue(leaf.is_deleted())
    cached = np.concatenate(outs, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], rtol=0, atol=1e-5)
    # One compilation for prefill, one for the decode shape (the index is traced).
    self.assertEqual(step._cache_size(), 2)

  # ------------------------------------------------------------------ numpy reference

  @parameterized.named_parameters(
      ("mha_untied", 4, False),
      ("gqa_untied", 2, False),
      ("mqa_tied", 1, True),
      ("gqa_tied", 2, True),
  )
  def test_matches_numpy_reference(self, num_kv_heads, tie):
    cfg = tiny_cfg(num_kv_heads=num_kv_heads, tie_embeddings=tie)
    policy = random_model("policy", cfg, seed=6)
    self.assertEqual(hasattr(policy, "lm_head_DxV"), not tie)
    rng = np.random.default_rng(6)
    tokens, mask = testing.left_padded_batch(rng, [8, 5, 2], 8, cfg.vocab_size)
    logits, _ = call(policy, tokens, mask)
    ref = np_policy_forward(params_numpy(policy), cfg, tokens, mask)
    real = mask.astype(bool)
    # The test is sensitive: logits vary by O(1) across the vocab.
    self.assertGreater(ref[real].std(), 0.3)
    np.testing.assert_allclose(np.asarray(logits)[real], ref[real], rtol=0, atol=1e-4)

  # ------------------------------------------------------------------ Hugging Face parity

  @parameterized.named_parameters(
      ("gqa", 2, False),
      ("mha", 4, False),
      ("tied", 2, True),
  )
  def test_hf_llama_parity(self, num_kv_heads, tie):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tie, initializer_range=0.1, max_position_embeddings=64)
    hf_cfg._attn_implementation = "eager"  # pylint: disable=protected-access
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
      for name, w in hf.named_parameters():
        if "norm" in name:  # Norm weights init to 1; make them matter.
          w.copy_(1.0 + 0.2 * torch.randn_like(w))

    rng = np.random.default_rng(7)
    t = 8
    tokens, mask = testing.left_padded_batch(rng, [8, 5, 2], t, 128)
    want, cfg, _, got = hf_and_imported_logits(hf, tokens, mask)
    self.assertEqual(cfg.num_kv_heads, num_kv_heads)
    self.assertEqual(cfg.tie_embeddings, tie)
    self.assertEqual(cfg.rope_theta, 500.0)
    self.assertEqual(cfg.rms_norm_eps, 1e-5)
    real = mask.astype(bool)
    self.assertGreater(want[real].std(), 0.3)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)

  @parameterized.named_parameters(
      # Scaled frequencies only show at long wavelengths: original_max_position_embeddings=64
      # puts this head dim's wavelengths (6 to ~1400) in all three llama3 regimes.
      ("llama3_rope", "llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
      ("linear_rope", "llama", {"rope_type": "linear", "factor": 4.0}),
      ("qwen2_biases", "qwen2", {"rope_type": "default"}),
  )
  def test_hf_variant_parity(self, model_type, rope):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    hf_cfg = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters=dict(rope, rope_theta=500.0), tie_word_embeddings=False,
        initializer_range=0.1, max_position_embeddings=64)
    hf_cfg._attn_implementation = "eager"  # pylint: disable=protected-access
    hf = model_cls(hf_cfg).float().eval()
    with torch.no_grad():
      for name, w in hf.named_parameters():
        if "norm" in name:
          w.copy_(1.0 + 0.2 * torch.randn_like(w))
        elif name.endswith("bias"):  # zero-initialised: make the biases matter
          w.copy_(0.5 * torch.randn_like(w))

    rng = np.random.default_rng(3)
    t = 24  # long enough for scaled and unscaled frequencies to diverge
    tokens, mask = testing.left_padded_batch(rng, [24, 13], t, 128)
    want, cfg, state, got = hf_and_imported_logits(hf, tokens, mask)
    self.assertEqual(cfg.qkv_bias, model_type == "qwen2")
    self.assertEqual(cfg.rope_scaling.kind, rope["rope_type"].replace("default", "none"))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)
    # The variant matters: without its scaling / biases the logits are clearly different.
    plain = dataclasses.replace(cfg, rope_scaling=config_lib.RopeScaling(), qkv_bias=False)
    pure = nnx.to_pure_dict(state)
    for blk in pure["trunk"]["blocks"].values():
      for k in ("q_bias_NxH", "k_bias_KxH", "v_bias_KxH"):
        blk["attn"].pop(k, None)
    graphdef, plain_state = nnx.split(nnx.eval_shape(lambda: heads.PolicyModel(plain, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(plain_state, pure)
    other, _ = call(nnx.merge(graphdef, plain_state), tokens, mask)
    self.assertGreater(np.abs(np.asarray(other)[real] - want[real]).max(), 1e-2)

  def test_hf_import_errors(self):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(FileNotFoundError, "config.json"):
        hf_import.load_hf_llama(d)
      path = os.path.join(d, "config.json")
      with open(path, "w") as f:
        json.dump({"model_type": "gpt2", "vocab_size": 128, "n_embd": 64}, f)
      with self.assertRaises(NotImplementedError) as ctx:
        hf_import.load_hf_llama(d)
      self.assertIn(path, str(ctx.exception))
      self.assertIn("gpt2", str(ctx.exception))
      llama = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
      for extra, what in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
                          ({"use_sliding_window": True}, "sliding")):
        with self.assertRaisesRegex((NotImplementedError, ValueError), what):
          hf_import.config_from_hf(dict(llama, **extra), path)

  # ------------------------------------------------------------------ config validation

  def test_config_unknown_key(self):
    with self.assertRaisesRegex(ValueError, "num_kv_head") as ctx:
      TransformerConfig.from_config({"vocab_size": 128, "num_kv_head": 2})
    self.assertIn("'num_kv_head'", str(ctx.exception))
    # A known-good dict round-trips.
    cfg = TransformerConfig.from_config({"vocab_size": 128, "num_kv_heads": 2})
    self.assertEqual((cfg.vocab_size, cfg.num_kv_heads), (128, 2))
    self.assertEqual(TransformerConfig.from_config(cfg.to_dict()), cfg)

  def test_config_unknown_key_from_config_dict(self):
    import ml_collections  # pylint: disable=g-import-not-at-top
    cd = ml_collections.ConfigDict({"d_model": 64, "mlp_dimm": 96})
    with self.assertRaisesRegex(ValueError, "mlp_dimm"):
      TransformerConfig.from_config(cd)

  def test_config_heads_not_multiple_of_kv_heads(self):
    with self.assertRaisesRegex(ValueError, "num_kv_heads"):
      TransformerConfig(d_model=64, num_heads=4, num_kv_heads=3)
    with self.assertRaisesRegex(ValueError, "num_kv_heads"):
      TransformerConfig.from_config({"d_model": 96, "num_heads": 6, "num_kv_heads": 4})
    # Valid GQA / MQA configurations are accepted.
    TransformerConfig(d_model=64, num_heads=4, num_kv_heads=2)
    TransformerConfig(d_model=64, num_heads=4, num_kv_heads=1)


if __name__ == "__main__":
  absltest.main()
