"""Mesh construction, the logical-axis rules, and sharded == unsharded numerics."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharded_init, sharding
from rlhf_jax.models import PolicyModel, RewardModel, TransformerConfig, ValueModel
from rlhf_jax.stages.sft import sft_loss
from rlhf_jax.train import state as state_lib

CFG = TransformerConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=96)
MESHES = (
    ("data8", dict(data=8, fsdp=1, tensor=1, expert=1)),
    ("data2_fsdp2_tensor2", dict(data=2, fsdp=2, tensor=2, expert=1)),
    ("fsdp4_tensor2", dict(data=1, fsdp=4, tensor=2, expert=1)),
)


def _batch(b=8, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  pads = rng.integers(0, t // 2, b)
  for i, p in enumerate(pads):  # left padding of varying length
    mask[i, :p] = 0
    tokens[i, :p] = 0
  loss_mask = mask.copy()
  loss_mask[:, : t // 2] = 0
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _unsharded(kind):
  model = kind(CFG, nnx.Rngs(params=0))
  return nnx.split(model)


class MeshTest(parameterized.TestCase):

  def test_fill_axis(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1))
    self.assertEqual(dict(mesh.shape), dict(data=2, fsdp=4, tensor=1, expert=1))

  @parameterized.parameters(
      (dict(data=-1, fsdp=-1), "at most one"),
      (dict(data=3), "needs 3 devices"),
      (dict(data=3, fsdp=-1), "do not divide"),
      (dict(model=2), "unknown axis"),
  )
  def test_bad_mesh(self, cfg, msg):
    with self.assertRaisesRegex(ValueError, msg):
      sharding.make_mesh(cfg)

  def test_rules(self):
    self.assertEqual(sharding.logical_to_spec(("embed", "mlp")), P("fsdp", "tensor"))
    # Expert-as-data: outside the expert FFNs the `expert` devices split the batch too.
    self.assertEqual(sharding.logical_to_spec(("activation_batch", None)),
                     P(("data", "fsdp", "expert"), None))
    # A mesh axis is used once per array: the expert dim of MoE buffers claims `expert` first.
    self.assertEqual(sharding.logical_to_spec(("activation_exp", "activation_batch")),
                     P("expert", ("data", "fsdp")))
    self.assertEqual(sharding.logical_to_spec(("norm",)), P(None))
    with self.assertRaisesRegex(KeyError, "no sharding rule"):
      sharding.logical_to_spec(("nonsense",))

  def test_indivisible_parameter_names_it(self):
    cfg = TransformerConfig(vocab_size=128, d_model=64, num_heads=4, num_kv_heads=1, mlp_dim=96)
    mesh = sharding.make_mesh(dict(data=4, tensor=2))
    with self.assertRaisesRegex(ValueError, r"k_DxKxH: dimension 1 \(logical axis 'kv_heads'\) "
                                r"has size 1, which does not divide mesh axis tensor of size 2"):
      sharding.init_sharded(lambda: PolicyModel(cfg, nnx.Rngs(0)), mesh)

  def test_indivisible_batch(self):
    mesh = sharding.make_mesh(dict(data=8))
    with self.assertRaisesRegex(ValueError, "'tokens'.*must divide data x fsdp x expert = 8"):
      sharding.shard_batch({"tokens": np.zeros((4, 3))}, mesh)


class InitShardedTest(parameterized.TestCase):

  def test_values_are_the_constructors_and_programs_are_shared(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    create = lambda: PolicyModel(CFG, nnx.Rngs(params=5))
    _, treedef, calls = sharded_init.init_programs(create, mesh)
    with sharding.use_mesh(mesh):  # what init_sharded runs
      params = jax.tree.unflatten(treedef, [program(*args) for program, args in calls])
    # Bit-identical to the constructor run as one jitted program (the former init_sharded).
    want = jax.jit(lambda: nnx.split(create())[1])()
    self.assertEqual(jax.tree.structure(params), jax.tree.structure(want))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, want)
    # One program per distinct parameter computation, shared by the layers: embed, lm_head,
    # q, k (= v), o, gate (= up), down, the norm scales.
    self.assertLen({id(program) for program, _ in calls}, 8)
    self.assertLen(calls, 2 + 2 * 9 + 1)
    up = params["trunk"]["blocks"][1]["mlp"]["up_DxF"][...]
    self.assertEqual(up.sharding.spec, P("fsdp", "tensor"))


class ShardedNumericsTest(parameterized.TestCase):

  @parameterized.named_parameters(*MESHES)
  def test_parameters_follow_rules(self, mesh_cfg):
    mesh = sharding.make_mesh(mesh_cfg)
    _, params = sharding.init_sharded(lambda: PolicyModel(CFG, nnx.Rngs(0)), mesh)
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    d, n, k, h, f, v = 64, 4, 2, 16, 96, 128
    attn = params["trunk"]["blocks"][0]["attn"]
    mlp = params["trunk"]["blocks"][0]["mlp"]
    expected = {
        "embed": (params["trunk"]["embed_VxD"], P("tensor", "fsdp"), (v // tensor, d // fsdp)),
        "q": (attn["q_DxNxH"], P("fsdp", "tensor", None), (d // fsdp, n // tensor, h)),
        "k": (attn["k_DxKxH"], P("fsdp", "tensor", None), (d // fsdp, k // tensor, h)),
        "o": (attn["o_NxHxD"], P("tensor", None, "fsdp"), (n // tensor, h, d // fsdp)),
        "up": (mlp["up_DxF"], P("fsdp", "tensor"), (d // fsdp, f // tensor)),
        "down": (mlp["down_FxD"], P("tensor", "fsdp"), (f // tensor, d // fsdp)),
        "lm_head": (params["lm_head_DxV"], P("fsdp", "tensor"), (d // fsdp, v // tensor)),
        "norm": (params["trunk"]["final_norm"]["scale"], P(None), (d,)),
    }
    for name, (var, spec, shard_shape) in expected.items():
      arr = var[...]
      self.assertEqual(arr.sharding.spec, spec, name)
      self.assertEqual(arr.addressable_shards[0].data.shape, shard_shape, name)

  @parameterized.named_parameters(*MESHES)
  def test_forward_matches_single_device(self, mesh_cfg):
    batch = _batch()
    models = {kind.__name__: _unsharded(kind) for kind in (PolicyModel, ValueModel, RewardModel)}

    def forward_all(params, b):
      outs = {}
      for name, (graphdef, _) in models.items():
        out = nnx.merge(graphdef, params[name])(b["tokens"], b["mask"])
        outs[name] = out[0] if isinstance(out, tuple) else out
      return outs

    params = {name: p for name, (_, p) in models.items()}
    want = jax.jit(forward_all)(params, batch)

    mesh = sharding.make_mesh(mesh_cfg)
    sparams = jax.device_put(params, sharding.param_shardings(params, mesh))
    with sharding.use_mesh(mesh):
      got = jax.jit(forward_all)(sparams, sharding.shard_batch(batch, mesh))
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in models:
      self.assertEqual(got[name].addressable_shards[0].data.shape[0], 8 // n_batch_shards)
      np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-5,
                                 rtol=1e-5, err_msg=name)

  _reference = None

  @classmethod
  def _single_device_steps(cls):
    """Three AdamW steps on one device; computed once, shared by every mesh."""
    if cls._reference is None:
      tx = optax.adamw(1e-3, weight_decay=0.1)
      batches = [_batch(seed=s) for s in range(3)]
      graphdef, params = _unsharded(PolicyModel)
      state, _ = state_lib.create_train_state(params, tx)
      step = state_lib.make_train_step(graphdef, sft_loss, tx)
      want = []
      for b in batches:
        state, m = step(state, b)
        want.append(jax.device_get(m))
      cls._reference = (tx, batches, want, jax.device_get(state.params))
    return cls._reference

  @parameterized.named_parameters(*MESHES)
  def test_train_step_matches_single_device(self, mesh_cfg):
    tx, batches, want, want_params = self._single_device_steps()

    mesh = sharding.make_mesh(mesh_cfg)
    graphdef, sparams = sharding.init_sharded(lambda: PolicyModel(CFG, nnx.Rngs(params=0)), mesh)
    sstate, shardings = state_lib.create_train_state(sparams, tx, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in batches[0]}
    sstep = state_lib.make_train_step(graphdef, sft_loss, tx, mesh, shardings, batch_sh)
    for b, w in zip(batches, want):
      sstate, m = sstep(sstate, sharding.shard_batch(b, mesh))
      for key in ("loss", "grad_norm", "token_accuracy"):
        np.testing.assert_allclose(float(m[key]), float(w[key]), rtol=1e-5, err_msg=key)
    # Parameters and Adam moments stay sharded as the rules say after the update.
    q = sstate.params["trunk"]["blocks"][0]["attn"]["q_DxNxH"][...]
    self.assertEqual(q.sharding.spec, P("fsdp", "tensor", None))
    mu = sstate.opt_state[0].mu["trunk"]["blocks"][0]["attn"]["q_DxNxH"][...]
    self.assertEqual(mu.sharding.spec, P("fsdp", "tensor", None))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 jax.device_get(sstate.params), want_params)
    # One program for every step: no recompilation after the first call.
    self.assertEqual(sstep.jitted._cache_size(), 1)


if __name__ == "__main__":
  absltest.main()
