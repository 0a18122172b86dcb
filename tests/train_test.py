"""Optimizer schedules against their closed forms; config key errors; the metrics writer."""

import json
import math
import os
import tempfile

from absl.testing import absltest, parameterized
import numpy as np

from rlhf_jax.train import loop, optim

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


class MetricsWriterTest(absltest.TestCase):

  def test_jsonl_tensorboard_and_resume_truncation(self):
    with tempfile.TemporaryDirectory() as wd:
      w = loop.MetricsWriter(wd, "sft")
      for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
      other = loop.MetricsWriter(wd, "rm")
      other.write(5, {"loss": 0.5})
      w.drop_after(2)  # a resumed run restarts after step 2: its step 3 row goes, rm stays
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual([(r["stage"], r["step"]) for r in rows], [("sft", 1), ("sft", 2), ("rm", 5)])
      self.assertTrue(os.listdir(os.path.join(wd, "tensorboard", "sft")))
      w.close()
      other.close()

  def test_check_finite(self):
    loop.check_finite(3, {"loss": 1.0})
    with self.assertRaisesRegex(FloatingPointError, "step 7: loss is inf"):
      loop.check_finite(7, {"loss": float("inf")})


if __name__ == "__main__":
  absltest.main()
