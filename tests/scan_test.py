"""Scanned layers (`model.scan_layers`) and rematerialisation (`model.remat`).

Every check compares against the unscanned, unrematerialised model with the same weights:
its logits (full forward, RM last token, value `keep`, packed rows, KV-cache prefill and
decode), its gradients (restacked), its MoE auxiliary losses, and the sampler's tokens and
log-probs (a scanned policy decodes from `transformer.unscanned`); plus the stacked layout
itself (same init, HF export/import, shardings). One jitted program per comparison, compiled
at XLA's lowest optimisation level (`run_fast`): each runs once, so compiling is the cost.
"""

from __future__ import annotations

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import sampling, sharding
from rlhf_jax.models import config as config_lib
from rlhf_jax.models import heads, hf_export, hf_import, moe, transformer

import testing  # tests/testing.py

V = 64
# GQA (2 kv heads for 4) with the LM head tied to the embedding.
GQA_TIED = config_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=3, num_heads=4,
                                        num_kv_heads=2, mlp_dim=48, tie_embeddings=True,
                                        rope_theta=500.0)
# MoE every 2nd of 4 layers: the scan steps over 2 groups of (dense, MoE) blocks. Capacity
# routing (tokens dropped) and router jitter (keyed by the layer index, traced in the scan).
MOE = dataclasses.replace(GQA_TIED, num_layers=4, moe=config_lib.MoEConfig(
    num_experts=4, top_k=2, moe_every=2, router_jitter=0.1, min_capacity=1,
    train_capacity_factor=0.5))


def variant(cfg, scan: bool, remat: str = "none"):
  return dataclasses.replace(cfg, scan_layers=scan, remat=remat)


def restack(cfg, pure: dict) -> dict:
  """A policy's pure dict in `cfg`'s layout (per-layer or stacked)."""
  return dict(pure, trunk=transformer.trunk_for(cfg, pure["trunk"]))


def policy_state(cfg, pure: dict) -> tuple[nnx.GraphDef, nnx.State]:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: heads.PolicyModel(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, restack(cfg, pure))
  return graphdef, state


def random_pure(cfg, seed: int) -> dict:
  """Per-layer (unscanned) policy params with every leaf random (norm scales around 1)."""
  _, state, _ = testing.random_state(lambda: heads.PolicyModel(variant(cfg, False),
                                                               nnx.Rngs(0)), seed, std=0.2)
  return jax.device_get(nnx.to_pure_dict(state))  # numpy: restacked without compiles


def batch(seed: int, b: int = 3, t: int = 10):
  rng = np.random.default_rng(seed)
  tokens, mask = testing.left_padded_batch(rng, rng.integers(3, t + 1, size=b), t, V)
  return jnp.asarray(tokens), jnp.asarray(mask)


# 3-5x faster compiles on CPU than the defaults, for programs that run once.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_fast(fn, *args):
  """`fn(*args)` jitted (or `fn` already jitted), compiled with `FAST`; numpy results."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return jax.device_get(jitted.lower(*args).compile(compiler_options=FAST)(*args))


def max_diff(a, b) -> float:
  """Largest absolute difference over two trees of arrays (numpy: no per-shape compiles)."""
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x, np.float64) - np.asarray(y)).max()), a, b)))


class LayoutTest(absltest.TestCase):
  """The stacked layout: no compiles."""

  def test_same_init_as_unscanned_and_stack_round_trip(self):
    cfg = MOE  # (dense, MoE) groups: scan period 2

    def init():
      # rbg keys: the same draws in both layouts either way, and faster to compile.
      key = jax.random.key(0, impl="rbg")
      return [nnx.to_pure_dict(nnx.state(heads.PolicyModel(c, nnx.Rngs(key))))
              for c in (cfg, variant(cfg, True))]

    flat, scanned = run_fast(init)
    self.assertEqual(set(scanned["trunk"]["stacked_blocks"]), {0, 1})
    self.assertEqual(scanned["trunk"]["stacked_blocks"][0]["attn"]["q_DxNxH"].shape,
                     (2, 32, 4, 8))
    self.assertIn("gate_ExDxF", scanned["trunk"]["stacked_blocks"][1]["mlp"])
    self.assertEqual(max_diff(restack(variant(cfg, True), flat), scanned), 0.0)
    back = transformer.per_layer_trunk(cfg, scanned["trunk"])
    self.assertEqual(max_diff(back, flat["trunk"]), 0.0)
    with self.assertRaisesRegex(ValueError, "are not layers 0..3"):
      transformer.stack_layers(MOE, {0: {}, 1: {}})

  def test_stacked_params_shard_like_their_layers(self):
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, expert=2))
    state = nnx.state(nnx.eval_shape(lambda: heads.PolicyModel(variant(MOE, True),
                                                               nnx.Rngs(0))))
    specs = nnx.to_pure_dict(sharding.param_shardings(state, mesh))
    blocks = specs["trunk"]["stacked_blocks"]
    self.assertEqual(blocks[0]["attn"]["q_DxNxH"].spec, P(None, "fsdp", "tensor", None))
    self.assertEqual(blocks[1]["mlp"]["gate_ExDxF"].spec, P(None, "expert", "fsdp", "tensor"))
    self.assertEqual(blocks[1]["mlp_norm"]["scale"].spec, P(None, None))

  def test_hf_export_import_round_trip(self):
    pure = random_pure(GQA_TIED, 1)
    scan_cfg = variant(GQA_TIED, True)
    scanned = restack(scan_cfg, pure)
    tensors = hf_export.policy_to_hf(scan_cfg, scanned)
    np.testing.assert_array_equal(tensors["model.layers.2.mlp.up_proj.weight"],
                                  pure["trunk"]["blocks"][2]["mlp"]["up_DxF"].T)
    self.assertEqual(max_diff(tensors, hf_export.policy_to_hf(GQA_TIED, pure)), 0.0)
    state = hf_import.hf_weights_to_params(scan_cfg, tensors)
    self.assertEqual(max_diff(nnx.to_pure_dict(state), scanned), 0.0)

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, r"`model.remat` is 'some'; choose one of \('none', "
                                r"'full', 'dots_saveable', 'minimal'\)"):
      config_lib.TransformerConfig(remat="some")
    with self.assertRaisesRegex(ValueError, r"`scan_layers` scans groups of `moe.moe_every` "
                                r"\(2\) layers, which must divide `num_layers` \(3\)"):
      dataclasses.replace(MOE, num_layers=3, scan_layers=True)

  def test_cache_layout_and_repeat(self):
    flat = transformer.init_cache(GQA_TIED, 2, 7)
    stacked = transformer.init_cache(variant(GQA_TIED, True), 2, 7)
    self.assertLen(flat.k, 3)
    self.assertEqual(stacked.k.shape, (3,) + flat.k[0].shape)
    self.assertEqual(stacked.v.shape, (3,) + flat.v[0].shape)
    k = jnp.arange(3 * 2).reshape(3, 2, 1, 1, 1) * jnp.ones((3, 2, 2, 8, 7))
    rep = stacked._replace(k=k, next_position_B=jnp.array([4, 5])).repeat_rows(2)
    self.assertEqual(rep.k.shape, (3, 4, 2, 8, 7))
    np.testing.assert_array_equal(rep.k[:, :, 0, 0, 0], [[0, 0, 1, 1], [2, 2, 3, 3],
                                                          [4, 4, 5, 5]])
    np.testing.assert_array_equal(rep.next_position_B, [4, 4, 5, 5])


class ScanNumericsTest(parameterized.TestCase):

  def test_forwards_match_unscanned(self):
    """Full forward, RM last token, value at `keep`, a packed row, a KV-cache prefill and
    decode step (the scanned cache: one [L, ...] array per k/v); GQA + tied."""
    cfg = GQA_TIED
    pure = random_pure(cfg, 2)
    tokens, mask = batch(2)
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10, [1] * 7 + [0] * 3])
    pos = jnp.asarray([list(range(4)) + list(range(6)), list(range(10)),
                       list(range(7)) + [0] * 3])

    def forwards(pure):
      out = []
      for c in (cfg, variant(cfg, True)):
        graphdef, state = policy_state(c, pure)
        model = nnx.merge(graphdef, state)
        trunk = model.trunk
        h_last, _ = trunk(tokens, mask, last_only=True)
        h_keep, _ = trunk(tokens, mask, keep=slice(-4, -1))
        h_packed, _ = trunk(tokens, seg > 0, segment_ids_BxT=seg, positions_BxT=pos)
        cache = transformer.init_cache(c, 3, 10)
        prefill, cache = model(tokens[:, :-1], mask[:, :-1], cache)
        step, _ = model(tokens[:, -1:], mask[:, -1:], cache)
        cached = jnp.concatenate([prefill, step], axis=1) * mask[..., None]
        out.append((model(tokens, mask)[0], h_last, h_keep, h_packed, cached))
      return out

    flat, scanned = run_fast(forwards, pure)
    np.testing.assert_allclose(scanned[-1], flat[0] * np.asarray(mask)[..., None], atol=2e-5)
    for name, a, b in zip(("logits", "last_only", "keep", "packed", "cached"), flat, scanned):
      self.assertEqual(a.shape, b.shape, name)
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=name)
    self.assertGreater(np.abs(flat[0]).max(), 1.0)

  def test_gradients_with_every_remat_policy(self):
    """Loss gradients of scan x remat all equal the plain model's (restacked), in one
    program; the remat variants do put `checkpoint` in the program."""
    cfg = dataclasses.replace(GQA_TIED, num_layers=2)
    pure = random_pure(cfg, 3)
    tokens, mask = batch(3)
    w_BxTxV = jax.random.normal(jax.random.key(0), (3, 10, V))
    # Scanned with remat "full": in the MoE test. Unrolled remat is checked once: XLA may
    # schedule its recomputation in the forward pass, so it is used with scan_layers.
    variants = [variant(cfg, False), variant(cfg, False, "full"), variant(cfg, True),
                variant(cfg, True, "dots_saveable"), variant(cfg, True, "minimal")]

    def loss(c, p):
      graphdef, state = policy_state(c, p)
      logits, _ = nnx.merge(graphdef, state)(tokens, mask)
      return jnp.sum(jax.nn.log_softmax(logits) * w_BxTxV * mask[..., None])

    def grads(pure):
      out = []
      for c in variants:
        g = jax.grad(lambda p, c=c: loss(c, p))(restack(c, pure))
        out.append(restack(cfg, g))  # per layer again
      return out

    results = run_fast(grads, pure)
    scale = max_diff(results[0], jax.tree.map(np.zeros_like, results[0]))
    self.assertGreater(scale, 1.0)
    for c, g in zip(variants, results):
      err = max_diff(results[0], g) / scale
      self.assertLess(err, 1e-6, f"scan_layers={c.scan_layers} remat={c.remat}: {err}")
    for c in variants[:4]:  # the forward holds checkpoints only with remat
      jaxpr = str(jax.make_jaxpr(lambda p, c=c: loss(c, p))(restack(c, pure)))
      self.assertEqual("remat" in jaxpr, c.remat != "none", c)

  def test_moe_logits_gradients_and_aux_losses(self):
    """MoE (dense, MoE) groups: scanned with and without remat equals unscanned, aux losses
    and routing metrics included (router jitter on: its key uses the traced layer index)."""
    cfg = MOE
    pure = random_pure(cfg, 4)
    tokens, mask = batch(4, t=12)
    variants = [variant(cfg, False), variant(cfg, True, "full")]

    def loss(c, p):
      graphdef, state = policy_state(c, p)
      model = nnx.merge(graphdef, state)
      logits, _ = model(tokens, mask)
      h_last, _ = model.trunk(tokens, mask, last_only=True)  # records a second time
      aux, metrics = moe.aux_loss(model)
      return jnp.mean(logits ** 2) + jnp.mean(h_last) + aux, (metrics, logits)

    def run(pure):
      out = []
      for c in variants:
        (_, aux), g = jax.value_and_grad(lambda p, c=c: loss(c, p), has_aux=True)(
            restack(c, pure))
        out.append((aux, restack(cfg, g)))
      return out

    results = run_fast(run, pure)
    (metrics, logits), grads = results[0]
    self.assertGreater(float(metrics["moe/dropped_fraction"]), 0.0)  # capacity binds
    self.assertGreater(float(metrics["moe/aux_loss"]), 0.0)
    for c, ((m, l), g) in zip(variants[1:], results[1:]):
      what = f"remat={c.remat}"
      np.testing.assert_allclose(l, logits, atol=2e-5, err_msg=what)
      for k in metrics:
        np.testing.assert_allclose(m[k], metrics[k], rtol=1e-5, err_msg=f"{what} {k}")
      self.assertLess(max_diff(grads, g), 1e-5, what)

  def test_sampler_matches_unscanned(self):
    """GQA + tied, 2 samples per prompt (the prefill's cache repeated); the scanned model
    decodes from `transformer.unscanned`."""
    cfg, num_samples = GQA_TIED, 2
    pure = random_pure(cfg, 5)
    tokens, mask = batch(5, b=2, t=6)
    s = sampling.SamplingConfig(max_new_tokens=5, temperature=0.8, num_samples=num_samples)
    outs = []
    for c in (cfg, variant(cfg, True, "full")):  # remat never reaches the KV-cache path
      graphdef, state = policy_state(c, pure)
      sampler = sampling.make_sampler(graphdef, s, eos_id=V, pad_id=0)
      outs.append(jax.device_get(run_fast(sampler, state, tokens, mask, jax.random.key(1))))
    flat, scanned = outs
    self.assertEqual(flat["tokens"].shape, (2 * num_samples, 5))
    np.testing.assert_array_equal(scanned["tokens"], flat["tokens"])
    np.testing.assert_allclose(scanned["logprobs"], flat["logprobs"], atol=2e-5)
    self.assertLess(flat["logprobs"].max(), -1e-3)


if __name__ == "__main__":
  absltest.main()
