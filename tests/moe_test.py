"""Sparse MoE FFN: routing, capacity and combine against a numpy loop over tokens, the
auxiliary losses, dense equivalence, KV-cache decoding, sharding with an `expert` axis, and a
short SFT run."""

import dataclasses
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline, sampling, sharding
from rlhf_jax.models import MoEConfig, TransformerConfig, heads, moe, transformer

import testing  # tests/testing.py


def make_cfg(num_layers=2, **moe_kwargs) -> TransformerConfig:
  m = {"num_experts": 4, "top_k": 2, "moe_every": 1, "min_capacity": 1}
  m.update(moe_kwargs)
  return TransformerConfig(vocab_size=64, d_model=16, num_layers=num_layers, num_heads=2,
                           num_kv_heads=2, mlp_dim=24, rope_theta=500.0, moe=MoEConfig(**m))


def randomize(create, seed: int):
  """(graphdef, state, numpy params) of `create()` with N(0, 0.3) weights, N(0, 1) router
  (decisive routing: float32 and float64 pick the same experts) and 1 + 0.2 N(0, 1) norms."""
  return testing.random_state(create, seed, std=0.3, stds={"router_DxE": 1.0},
                              dtype=jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def run_layer(graphdef, state, x, mask, eval_mode=False):
  layer = nnx.merge(graphdef, state)
  if eval_mode:
    layer.eval()
  y = layer(x, mask)
  aux, metrics = moe.aux_loss(layer)
  return y, aux, metrics


@functools.partial(jax.jit, static_argnums=(0,))
def policy_forward(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  logits, _ = model(tokens, mask)
  return logits, moe.aux_loss(model)


def inputs(seed, b=3, t=12, d=16):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  mask = np.ones((b, t), bool)
  mask[1, :3] = False  # left pads
  mask[2, -2:] = False  # right pads
  return x, mask


# ------------------------------------------------------------------------ numpy reference


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_expert(p, e, x_d):
  g = x_d @ p["gate_ExDxF"][e]
  return (g / (1.0 + np.exp(-g)) * (x_d @ p["up_ExDxF"][e])) @ p["down_ExFxD"][e]


def np_moe(p, x, mask, top_k, capacity):
  """(y, kept, choice, logits, probs): a loop over tokens, all first choices of a sequence in
  token order, then all second choices; an expert stops taking tokens once `capacity` are in
  (None: no limit)."""
  logits = x.astype(np.float64) @ p["router_DxE"]
  probs = np_softmax(logits)
  b, t, _ = x.shape
  choice = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  top = np.take_along_axis(probs, choice, -1)
  gates = top / top.sum(-1, keepdims=True) if top_k == 2 else top
  y = np.zeros(x.shape, np.float64)
  kept = np.zeros((b, t, top_k), bool)
  for row in range(b):
    used = np.zeros(probs.shape[-1], int)
    for j in range(top_k):
      for tok in range(t):
        if not mask[row, tok]:
          continue
        e = choice[row, tok, j]
        if capacity is not None and used[e] >= capacity:
          continue  # dropped: this expert adds nothing for this token
        used[e] += 1
        kept[row, tok, j] = True
        y[row, tok] += gates[row, tok, j] * np_expert(p, e, x[row, tok].astype(np.float64))
  return y, kept, choice, logits, probs


def np_aux(logits, probs, choice, kept, mask, num_experts, top_k):
  w = mask.astype(np.float64)
  n = w.sum()
  counts = np.zeros(num_experts)
  for e in range(num_experts):
    counts[e] = ((choice == e) & mask[..., None]).sum()
  f = counts / (n * top_k)
  p_mean = (probs * w[..., None]).sum((0, 1)) / n
  lse = np.log(np.exp(logits).sum(-1))
  return {"load_balance": num_experts * (f * p_mean).sum(),
          "router_z": (lse ** 2 * w).sum() / n,
          "dropped": 1.0 - (kept & mask[..., None]).sum() / (n * top_k),
          "load": f * num_experts}


class RoutingTest(parameterized.TestCase):

  def test_capacity_formula(self):
    m = MoEConfig(num_experts=4, top_k=2)
    self.assertEqual((m.train_capacity_factor, m.eval_capacity_factor, m.min_capacity),
                     (1.25, 2.0, 4))
    self.assertEqual(moe.expert_capacity(m, 48, train=True), 30)  # round(1.25 * 48 * 2 / 4)
    self.assertEqual(moe.expert_capacity(m, 48, train=False), 48)
    m8 = MoEConfig(num_experts=8, top_k=1)
    self.assertEqual(moe.expert_capacity(m8, 64, train=True), 10)
    self.assertEqual(moe.expert_capacity(m8, 16, train=True), 4)  # min_capacity
    self.assertEqual(moe.expert_capacity(m8, 1, train=True), 1)  # never more slots than tokens

  @parameterized.named_parameters(
      ("top1_train", 1, False, 0.6, 1.0),
      ("top2_train", 2, False, 0.6, 1.0),
      ("top2_eval", 2, True, 0.6, 1.0),  # eval mode: the eval factor decides the capacity
      ("top2_dropless", 2, False, None, None),
  )
  def test_layer_matches_numpy(self, top_k, eval_mode, train_cf, eval_cf):
    dropless = train_cf is None
    cf = {"train_capacity_factor": train_cf or 1.0, "eval_capacity_factor": eval_cf or 1.0}
    cfg = make_cfg(top_k=top_k, dropless=dropless, load_balance_coef=0.3, z_loss_coef=0.07,
                   **cf)
    graphdef, state, p = randomize(lambda: moe.MoE(cfg, nnx.Rngs(0)), seed=top_k)
    x, mask = inputs(seed=top_k)
    t = x.shape[1]
    capacity = None
    if not dropless:
      factor = eval_cf if eval_mode else train_cf
      capacity = max(1, round(factor * t * top_k / 4))
    want, kept, choice, logits, probs = np_moe(p, x, mask, top_k, capacity)
    y, aux, metrics = run_layer(graphdef, state, x, mask, eval_mode)

    # Routing and capacity: the same experts, the same assignments kept.
    _, _, experts = moe.route(jnp.asarray(logits, jnp.float32), top_k)
    np.testing.assert_array_equal(np.asarray(experts), choice)
    if capacity is not None:
      _, got_kept = moe.capacity_slots(experts, mask, 4, moe.expert_capacity(
          cfg.moe, t, train=not eval_mode))
      np.testing.assert_array_equal(np.asarray(got_kept), kept)
      if not eval_mode:  # the test must exercise dropping, including whole tokens
        self.assertGreater((~kept & mask[..., None]).sum(), 2)
        self.assertTrue((~kept.any(-1) & mask).any())
    # Combine: dropped tokens get exactly 0 (the residual passes unchanged), pads too.
    y = np.asarray(y)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[~kept.any(-1)], 0.0)
    self.assertGreater(np.abs(want).max(), 0.5)

    ref = np_aux(logits, probs, choice, kept, mask, 4, top_k)
    np.testing.assert_allclose(metrics["moe/load_balance_loss"], ref["load_balance"], rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/router_z_loss"], ref["router_z"], rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/dropped_fraction"], ref["dropped"], atol=1e-6)
    np.testing.assert_allclose(metrics["moe/expert_load_min"], ref["load"].min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/expert_load_max"], ref["load"].max(), rtol=1e-5)
    np.testing.assert_allclose(aux, 0.3 * ref["load_balance"] + 0.07 * ref["router_z"],
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["moe/aux_loss"], aux, rtol=1e-6)
    if dropless:
      self.assertEqual(float(metrics["moe/dropped_fraction"]), 0.0)

  def test_moe_every_and_aux_losses_sum_over_layers(self):
    every2 = nnx.eval_shape(lambda: heads.PolicyModel(make_cfg(num_layers=4, moe_every=2),
                                                      nnx.Rngs(0)))
    self.assertEqual([isinstance(b.mlp, moe.MoE) for b in every2.trunk.blocks],
                     [False, True, False, True])
    cfg = make_cfg(num_layers=2, moe_every=1)
    graphdef, state, _ = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=5)
    tokens = np.random.default_rng(5).integers(0, 64, (2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.int32)

    @jax.jit
    def per_layer(state):
      model = nnx.merge(graphdef, state)
      model(tokens, mask)
      layer_losses = [moe.aux_loss(block)[0] for block in model.trunk.blocks]
      return layer_losses, moe.aux_loss(model)[0]  # everything is popped already: 0

    layer_losses, rest = per_layer(state)
    _, (total, _) = policy_forward(graphdef, state, tokens, mask)
    self.assertGreater(min(map(float, layer_losses)), 0.0)
    np.testing.assert_allclose(total, sum(layer_losses), rtol=1e-6)
    self.assertEqual(float(rest), 0.0)

  @parameterized.named_parameters(("capacity", False), ("dropless", True))
  def test_one_expert_equals_dense(self, dropless):
    """E = 1, top-1, capacity >= T: the MoE layer is exactly its SwiGLU expert."""
    cfg = make_cfg(num_layers=1, num_experts=1, top_k=1, dropless=dropless, min_capacity=64)
    dense_cfg = dataclasses.replace(cfg, moe=MoEConfig())
    graphdef, state, p = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=7)
    dense_graphdef, dense_state = nnx.split(
        nnx.eval_shape(lambda: heads.PolicyModel(dense_cfg, nnx.Rngs(0))))
    dense = jax.tree.map(lambda a: a, p)
    for blk in dense["trunk"]["blocks"].values():
      e = blk.pop("mlp")
      blk["mlp"] = {"gate_DxF": e["gate_ExDxF"][0], "up_DxF": e["up_ExDxF"][0],
                    "down_FxD": e["down_ExFxD"][0]}
    nnx.replace_by_pure_dict(dense_state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                                                       dense))
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 64, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, :4] = 0
    got, _ = policy_forward(graphdef, state, tokens, mask)
    want, (aux, metrics) = policy_forward(dense_graphdef, dense_state, tokens, mask)
    self.assertEqual((float(aux), metrics), (0.0, {}))  # a dense model has no aux loss
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-5)

  @parameterized.named_parameters(("top1_capacity", 1, False), ("top2_dropless", 2, True))
  def test_gradients_finite_and_nonzero(self, top_k, dropless):
    cfg = make_cfg(top_k=top_k, dropless=dropless, train_capacity_factor=0.6)
    graphdef, state, _ = randomize(lambda: moe.MoE(cfg, nnx.Rngs(0)), seed=11)
    x, mask = inputs(seed=11)
    target = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)

    def loss(state, with_aux):
      layer = nnx.merge(graphdef, state)
      y = layer(x, mask)
      aux, _ = moe.aux_loss(layer)
      return jnp.mean((y - target) ** 2) + (aux if with_aux else 0.0)

    for with_aux in (False, True):  # the router learns from the task loss alone, too
      grads = nnx.to_pure_dict(jax.jit(jax.grad(loss), static_argnums=1)(state, with_aux))
      for name, g in grads.items():
        g = np.asarray(g)
        self.assertTrue(np.all(np.isfinite(g)), name)
        self.assertGreater(np.abs(g).max(), 1e-6, f"{name} with_aux={with_aux}")
        if name != "router_DxE":  # every expert received tokens, so each has a gradient
          self.assertTrue(np.all(np.abs(g).reshape(4, -1).max(1) > 0), name)

  def test_train_eval_modes_and_jitter(self):
    cfg = make_cfg(router_jitter=0.5, train_capacity_factor=0.5, eval_capacity_factor=4.0)
    graphdef, state, _ = randomize(lambda: moe.MoE(cfg, nnx.Rngs(0)), seed=13)
    plain = nnx.merge(graphdef, state)
    plain.set_attributes(cfg=MoEConfig(**{**vars(cfg.moe), "router_jitter": 0.0}))
    plain_graphdef = nnx.split(plain)[0]
    x, mask = inputs(seed=13)
    y_train, _, m_train = run_layer(graphdef, state, x, mask, False)
    y_again, _, _ = run_layer(graphdef, state, x, mask, False)
    y_plain, _, _ = run_layer(plain_graphdef, state, x, mask, False)
    y_eval, _, m_eval = run_layer(graphdef, state, x, mask, True)
    y_plain_eval, _, _ = run_layer(plain_graphdef, state, x, mask, True)
    # Jitter: noisy in train mode yet a pure function of the input; off in eval mode.
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_again))
    self.assertGreater(np.abs(np.asarray(y_train) - np.asarray(y_plain)).max(), 1e-3)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_plain_eval))
    # Capacity: the train factor drops assignments, the eval factor none.
    self.assertGreater(float(m_train["moe/dropped_fraction"]), 0.1)
    self.assertEqual(float(m_eval["moe/dropped_fraction"]), 0.0)
    # model.train() undoes model.eval().
    model = nnx.merge(graphdef, state)
    model.eval()
    self.assertTrue(model.deterministic)
    model.train()
    self.assertFalse(model.deterministic)


class IntegrationTest(parameterized.TestCase):

  @parameterized.named_parameters(("capacity", False), ("dropless", True))
  def test_kv_cache_decode_matches_full_forward(self, dropless):
    # Capacity >= T for the capacity path: decoding never drops (one token per group), so
    # it matches a full forward only when the full forward drops nothing either.
    cfg = make_cfg(num_layers=1, dropless=dropless, train_capacity_factor=2.0)
    graphdef, state, _ = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=17)
    rng = np.random.default_rng(17)
    p, gen = 6, 4
    tokens = rng.integers(0, 64, (3, p + gen)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # left-padded prompt
    mask[2, :5] = 0
    full, (_, metrics) = policy_forward(graphdef, state, tokens, mask)
    self.assertEqual(float(metrics["moe/dropped_fraction"]), 0.0)

    @jax.jit
    def step(state, tokens, mask, cache):
      model = nnx.merge(graphdef, state)
      logits, cache = model(tokens, mask, cache)
      # Generation records nothing (no aux loss to pop, and no state to leak).
      return logits, cache, len(nnx.to_flat_state(nnx.state(model, moe.MoEStats)))

    cache = transformer.init_cache(cfg, 3, p + gen)
    logits, cache, recorded = step(state, tokens[:, :p], mask[:, :p], cache)
    outs = [logits]
    for i in range(p, p + gen):
      logits, cache, _ = step(state, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
      outs.append(logits)
    self.assertEqual(recorded, 0)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], np.asarray(full)[real], atol=1e-5)

  def test_sampler_logprobs_match_full_forward(self):
    """Dropless routing: the sampler's log-probs are those of one full forward (PPO)."""
    cfg = make_cfg(num_layers=1, dropless=True)
    graphdef, state, _ = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=19)
    sampler = sampling.make_sampler(graphdef, sampling.SamplingConfig(max_new_tokens=6),
                                    eos_id=2, pad_id=0)
    prompts = np.random.default_rng(19).integers(3, 64, (4, 5)).astype(np.int32)
    pmask = np.ones_like(prompts)
    pmask[0, :2] = 0
    out = jax.device_get(sampler(state, prompts, pmask, jax.random.key(0)))
    seq = np.concatenate([prompts, out["tokens"]], 1)
    seq_mask = np.concatenate([pmask, out["mask"]], 1)
    logits, _ = policy_forward(graphdef, state, seq, seq_mask)
    logp = jax.nn.log_softmax(np.asarray(logits)[:, 4:-1], -1)
    want = np.take_along_axis(np.asarray(logp), out["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], want * out["mask"], atol=1e-4)

  def test_aux_statistics_never_reach_split_state(self):
    cfg = make_cfg(num_layers=1)
    graphdef, state, _ = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=21)
    seen = {}

    @jax.jit
    def forward(state):  # Python below runs once, at trace time, on the merged module.
      model = nnx.merge(graphdef, state)
      model(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))
      seen["recorded"] = len(nnx.to_flat_state(nnx.state(model, moe.MoEStats)))
      aux, metrics = moe.aux_loss(model)
      seen["structure_after_pop"] = jax.tree.structure(nnx.state(model))
      seen["popped_again"] = moe.aux_loss(model)[1]
      return aux, metrics

    aux, metrics = forward(state)
    self.assertEqual(seen["recorded"], 1)
    self.assertGreater(float(aux), 0.0)
    self.assertIn("moe/dropped_fraction", metrics)
    self.assertEqual(seen["structure_after_pop"], jax.tree.structure(state))  # params only
    self.assertEqual(seen["popped_again"], {})

  @parameterized.named_parameters(
      ("data2_expert4_capacity", {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}, False),
      ("fsdp2_tensor2_expert2_dropless", {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2},
       True),
  )
  def test_sharded_forward_matches_single_device(self, mesh_cfg, dropless):
    cfg = make_cfg(num_layers=1, dropless=dropless, train_capacity_factor=0.75)
    graphdef, state, _ = randomize(lambda: heads.PolicyModel(cfg, nnx.Rngs(0)), seed=23)
    rng = np.random.default_rng(23)
    tokens = rng.integers(0, 64, (8, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    for i, n in enumerate(rng.integers(0, 5, 8)):
      mask[i, :n] = 0
    want_logits, (want_aux, want_m) = policy_forward(graphdef, state, tokens, mask)

    mesh = sharding.make_mesh(mesh_cfg)
    sstate = jax.device_put(state, sharding.param_shardings(state, mesh))
    gate = sstate["trunk"]["blocks"][0]["mlp"]["gate_ExDxF"][...]
    self.assertEqual(gate.sharding.spec, P("expert", "fsdp", "tensor"))
    self.assertEqual(gate.addressable_shards[0].data.shape[0], 4 // mesh.shape["expert"])
    b = sharding.shard_batch({"t": tokens, "m": mask}, mesh)
    self.assertEqual(b["t"].addressable_shards[0].data.shape[0],  # expert-as-data
                     8 // (mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]))
    with sharding.use_mesh(mesh):
      got_logits, (got_aux, got_m) = policy_forward(graphdef, sstate, b["t"], b["m"])
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5)
    np.testing.assert_allclose(got_aux, want_aux, rtol=1e-5)
    for k in want_m:
      np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
    if not dropless:
      self.assertGreater(float(want_m["moe/dropped_fraction"]), 0.0)

  def test_short_sft_run_lowers_loss_with_expert_axis(self):
    cfg = config_lib.sft_config("test")
    cfg.model.moe.update(num_experts=4, top_k=2, moe_every=2)  # layer 0 dense, layer 1 MoE
    cfg.mesh.update(data=-1, expert=2)  # 8 fake devices: data 4 x expert 2
    cfg.sft.train.update(num_steps=10, log_every=10, eval_every=0)
    out = pipeline.run(cfg, None)  # no workdir: no checkpoints, no metrics files
    result = out.stages["sft"]
    m = result.metrics
    # A fresh model predicts ~uniformly over the byte vocabulary: CE ~ log(V).
    self.assertLess(m["ce_loss"], 0.7 * np.log(out.policy.model_config.vocab_size))
    self.assertAlmostEqual(m["loss"], m["ce_loss"] + m["moe/aux_loss"], places=4)
    self.assertBetween(m["moe/aux_loss"], 1e-3, 0.1)
    self.assertBetween(m["moe/dropped_fraction"], 0.0, 0.5)
    self.assertLessEqual(m["moe/expert_load_min"], 1.0)
    self.assertGreaterEqual(m["moe/expert_load_max"], 1.0)
    gate = result.state.params["trunk"]["blocks"][1]["mlp"]["gate_ExDxF"][...]
    self.assertEqual(gate.sharding.spec, P("expert", "fsdp", "tensor"))
    # The train state holds parameters and optimizer moments only, no recorded statistics.
    self.assertEmpty([p for p, _ in jax.tree_util.tree_leaves_with_path(result.state)
                      if "stats" in jax.tree_util.keystr(p)])


class ConfigTest(absltest.TestCase):

  def test_nested_moe_config(self):
    cd = ml_collections.ConfigDict(config_lib.model_config().to_dict())
    cd.moe.num_experts = 8  # what --config.model.moe.num_experts=8 does
    cfg = TransformerConfig.from_config(dict(cd, vocab_size=64))
    self.assertEqual((cfg.moe.num_experts, cfg.moe.top_k), (8, 2))
    self.assertEqual(TransformerConfig.from_config(cfg.to_dict()), cfg)
    self.assertEqual(TransformerConfig.from_config({"vocab_size": 64}).moe.num_experts, 0)
    with self.assertRaisesRegex(ValueError, r"model.moe config: unknown key\(s\) 'num_expert' "
                                r"\(did you mean 'num_experts'\?\)"):
      TransformerConfig.from_config({"moe": {"num_expert": 4}})
    with self.assertRaisesRegex(ValueError, "top_k"):
      MoEConfig(num_experts=4, top_k=3)
    with self.assertRaisesRegex(ValueError, "exceeds"):
      MoEConfig(num_experts=1, top_k=2)


if __name__ == "__main__":
  absltest.main()
