"""Optimizer schedules against their closed forms; config key errors; the metrics writer."""

import json
import math
import os
import tempfile

from absl.testing import absltest, parameterized
import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.train import metrics, optim, state as state_lib

CFG = dict(learning_rate=2.0, warmup_steps=10, decay_steps=110, end_lr_ratio=0.1)


class ScheduleTest(parameterized.TestCase):

  @parameterized.parameters(0, 5, 10, 40, 110, 500)
  def test_cosine(self, step):
    lr = float(optim.make_schedule(dict(CFG, schedule="cosine"))(step))
    if step <= 10:
      want = 2.0 * step / 10
    else:
      frac = min(step - 10, 100) / 100
      want = 0.2 + (2.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * frac))
    self.assertAlmostEqual(lr, want, places=5)

  @parameterized.parameters(0, 5, 10, 60, 110, 500)
  def test_linear(self, step):
    lr = float(optim.make_schedule(dict(CFG, schedule="linear"))(step))
    want = 2.0 * step / 10 if step <= 10 else 2.0 + (0.2 - 2.0) * min(step - 10, 100) / 100
    self.assertAlmostEqual(lr, want, places=5)

  def test_constant(self):
    fn = optim.make_schedule(dict(CFG, schedule="constant"))
    np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 10, 1000)], [0, 1, 2, 2], atol=1e-6)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "did you mean 'warmup_steps'"):
      optim.make_optimizer(dict(CFG, warmup_step=3))
    with self.assertRaisesRegex(ValueError, "choose 'cosine', 'linear' or 'constant'"):
      optim.make_schedule(dict(CFG, schedule="exp"))
    with self.assertRaisesRegex(ValueError, "decay_steps"):
      optim.make_schedule(dict(CFG, decay_steps=5))


def _regression_loss(model, batch):
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err ** 2), {"abs_err": jnp.mean(jnp.abs(err))}


class GradAccumulationTest(parameterized.TestCase):
  """k micro-batches inside one step == one step on the whole batch (the loss is a plain
  mean over rows, so the mean of micro-batch gradients is the full-batch gradient)."""

  @parameterized.parameters((2, False), (4, False), (2, True))
  def test_matches_full_batch(self, k, sharded):
    graphdef, params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(16, 3)).astype(np.float32),
                "y": rng.normal(size=(16, 2)).astype(np.float32)} for _ in range(3)]
    tx = optax.adamw(1e-2)
    results = []
    for steps in (1, k):
      mesh, shardings, batch_sh = None, None, None
      p = jax.tree.map(jnp.copy, params)
      if sharded:
        mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1, expert=1, num_devices=8))
        p = jax.device_put(p, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        batch_sh = {"x": sharding.batch_sharding(mesh, 2), "y": sharding.batch_sharding(mesh, 2)}
      state, shardings = state_lib.create_train_state(p, tx, mesh)
      step = state_lib.make_train_step(graphdef, _regression_loss, tx, mesh, shardings, batch_sh,
                                       grad_accum_steps=steps)
      rows = []
      for b in batches:
        state, m = step(state, b if mesh is None else sharding.shard_batch(b, mesh))
        rows.append({key: float(v) for key, v in m.items()})
      results.append((state, rows))
    (full, full_rows), (acc, acc_rows) = results
    for key in ("loss", "grad_norm", "abs_err"):
      np.testing.assert_allclose([r[key] for r in acc_rows], [r[key] for r in full_rows],
                                 rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 acc.params, full.params)
    self.assertEqual(int(acc.step), 3)

  def test_indivisible_batch(self):
    graphdef, params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.1)
    state, _ = state_lib.create_train_state(params, tx)
    step = state_lib.make_train_step(graphdef, _regression_loss, tx, grad_accum_steps=3)
    with self.assertRaisesRegex(ValueError, "optim.grad_accum_steps=3"):
      step(state, {"x": np.zeros((8, 3), np.float32), "y": np.zeros((8, 2), np.float32)})
    with self.assertRaisesRegex(ValueError, "must be >= 1"):
      state_lib.make_train_step(graphdef, _regression_loss, tx, grad_accum_steps=0)


class MetricsWriterTest(absltest.TestCase):

  def test_jsonl_tensorboard_and_resume_truncation(self):
    with tempfile.TemporaryDirectory() as wd:
      w = metrics.MetricsWriter(wd, "sft")
      for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
      other = metrics.MetricsWriter(wd, "rm")
      other.write(5, {"loss": 0.5})
      w.drop_after(2)  # a resumed run restarts after step 2: its step 3 row goes, rm stays
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual([(r["stage"], r["step"]) for r in rows], [("sft", 1), ("sft", 2), ("rm", 5)])
      self.assertTrue(os.listdir(os.path.join(wd, "tensorboard", "sft")))
      w.close()
      other.close()

  def test_check_finite(self):
    metrics.check_finite(3, {"loss": 1.0})
    with self.assertRaisesRegex(FloatingPointError, "step 7: loss is inf"):
      metrics.check_finite(7, {"loss": float("inf")})


if __name__ == "__main__":
  absltest.main()
