"""Optimizer schedules against their closed forms; config key errors; the metrics writer."""

import errno
import json
import math
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized
import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.train import checkpoint, metrics, optim, state as state_lib

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


def _truncate_data_files(step_dir):
  """Halves every array data file of the step's params (a copy cut short)."""
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == "d":
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for name in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        with open(path, "wb") as f:
          f.write(bytes(data))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


class DamagedCheckpointTest(parameterized.TestCase):
  """A damaged latest checkpoint: a warning and the previous good step, or one error."""

  def setUp(self):
    super().setUp()
    self.dir = self._tempdir()
    self.params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    self.state, _ = state_lib.create_train_state(self.params, optax.adam(1e-2))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=1, keep=5)
    for step in (1, 2, 3):
      ckpt.maybe_save(step, self._state(step), {"step": step, "data_position": step})
    ckpt.close()

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def _state(self, step):
    return self.state.replace(step=jnp.int32(step),
                              params=jax.tree.map(lambda x: x + step, self.params))

  @parameterized.named_parameters(
      ("truncated_file", _truncate_data_files),
      ("flipped_bytes", _flip_bytes),
      ("empty_step_folder", _empty),
      ("no_meta_metadata", lambda d: os.remove(os.path.join(d, "meta", "metadata"))))
  def test_falls_back_to_previous_step(self, damage):
    damage(os.path.join(self.dir, "3"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=1, keep=5)
    self.assertEqual(ckpt.latest_step(), 3)
    with self.assertLogs("absl", level="WARNING") as logs:
      state, meta = ckpt.restore(self.state)
    self.assertTrue(any(os.path.join(self.dir, "3") in line for line in logs.output),
                    logs.output)
    self.assertEqual((int(state.step), meta["step"], ckpt.restored_step), (2, 2, 2))
    np.testing.assert_allclose(state.params["b"], np.ones(3) + 2)
    self.assertEqual(ckpt.latest_good_step(), 2)
    # The resumed run moves the damaged folder aside and saves step 3 again.
    with self.assertLogs("absl", level="WARNING") as logs:
      self.assertTrue(ckpt.maybe_save(3, self._state(3), {"step": 3, "data_position": 3}))
    self.assertIn(f"aside to {self.dir}/3.damaged", logs.output[0])
    self.assertTrue(os.path.isdir(os.path.join(self.dir, "3.damaged")))
    state, meta = ckpt.restore(self.state)
    self.assertEqual((int(state.step), meta["step"]), (3, 3))
    ckpt.close()

  def test_missing_metadata_files_still_restore(self):
    # Orbax needs neither file when the caller gives the tree's shapes: nothing is lost.
    os.remove(os.path.join(self.dir, "3", "_CHECKPOINT_METADATA"))
    os.remove(os.path.join(self.dir, "3", "params", "_METADATA"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=0)
    state, meta = ckpt.restore(self.state)
    self.assertEqual((int(state.step), meta["step"]), (3, 3))
    np.testing.assert_allclose(state.params["b"], np.ones(3) + 3)
    ckpt.close()

  def test_restore_params_falls_back(self):
    _truncate_data_files(os.path.join(self.dir, "3"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=0)
    with self.assertLogs("absl", level="WARNING"):
      params = ckpt.restore_params(self.params)
    np.testing.assert_allclose(params["w"], np.arange(6.0).reshape(2, 3) + 2)
    self.assertEqual(ckpt.restored_step, 2)
    ckpt.close()

  def test_latest_good_step_sees_an_empty_folder(self):
    _empty(os.path.join(self.dir, "3"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=0)
    self.assertEqual((ckpt.latest_step(), ckpt.latest_good_step()), (3, 2))
    ckpt.close()

  def test_all_damaged_is_one_line_error(self):
    _empty(os.path.join(self.dir, "3"))
    _truncate_data_files(os.path.join(self.dir, "2"))
    _flip_bytes(os.path.join(self.dir, "1"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=0)
    for restore in (lambda: ckpt.restore(self.state), lambda: ckpt.restore_params(self.params)):
      with self.assertLogs("absl", level="WARNING"):
        with self.assertRaisesRegex(
            ValueError, rf"^{self.dir}: no checkpoint could be restored \(step 3: .*; step 2: "
            r".*; step 1: .*\); delete the damaged step folders or use a fresh --workdir\.$"
        ) as err:
          restore()
      self.assertNotIn("\n", str(err.exception))
    ckpt.close()

  def test_explicit_damaged_step_is_one_line_error(self):
    _empty(os.path.join(self.dir, "3"))
    ckpt = checkpoint.Checkpointer(self.dir, save_every=0)
    with self.assertRaisesRegex(ValueError, rf"^{self.dir}/3: checkpoint of step 3 could not "
                                "be restored .*; delete that step folder"):
      ckpt.restore(self.state, step=3)
    with self.assertRaisesRegex(FileNotFoundError, rf"^{self.dir}/7: no checkpoint of step 7"):
      ckpt.restore(self.state, step=7)
    ckpt.close()

  def test_full_disk_names_the_step_folder(self):
    ckpt = checkpoint.Checkpointer(self.dir, save_every=1, keep=5)
    # tensorstore reports a full disk as text in a ValueError.
    with mock.patch.object(ckpt._mngr, "save", side_effect=ValueError(
        "RESOURCE_EXHAUSTED: Error writing local file: No space left on device")):
      with self.assertRaisesRegex(OSError, "^no space left on device / file too large: "
                                  rf"{self.dir}/4; free space") as err:
        ckpt.maybe_save(4, self._state(4), {"step": 4})
    self.assertNotIn("\n", str(err.exception))
    self.assertEqual(err.exception.errno, errno.ENOSPC)
    with mock.patch.object(ckpt._mngr, "save", side_effect=ValueError("other")):
      with self.assertRaisesRegex(ValueError, "^other$"):
        ckpt.maybe_save(4, self._state(4), {"step": 4})
    ckpt.close()

  def test_no_checkpoint(self):
    ckpt = checkpoint.Checkpointer(self._tempdir(), save_every=0)
    with self.assertRaisesRegex(FileNotFoundError, "no checkpoint there"):
      ckpt.restore(self.state)
    ckpt.close()


if __name__ == "__main__":
  absltest.main()
