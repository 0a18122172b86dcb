"""Nothing lost, every bad input one clear line: non-finite states are never saved, a failed or
changed rerun leaves a finished stage intact, a finished run reports its saved metrics, and
`main` reports an expected error as one line with a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

import testing
from rlhf_jax import artifacts, pipeline, sharding, stage_settings
from rlhf_jax.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_rows(path: str) -> list[dict]:
  """metrics.jsonl parsed as strict JSON (NaN / Infinity are refused)."""
  def refuse(name):
    raise ValueError(f"{path}: non-strict JSON constant {name}")
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _snapshot(folder: str) -> dict[str, bytes]:
  """Every file under `folder` with its bytes."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _copy_stages(workdir: str, stages) -> None:
  shared, _ = testing.shared_pipeline()
  for stage in stages:
    shutil.copytree(os.path.join(shared, stage), os.path.join(workdir, stage))


class NothingLostTest(absltest.TestCase):

  def test_non_finite_state_is_never_saved(self):
    """Learning rate 1e6, a checkpoint every 2 steps, a log line every 10: the run stops at
    the first save of a non-finite state, and every checkpoint left restores finite."""
    cfg = testing.pipeline_config("sft")
    cfg.sft.optim.update(learning_rate=1e6, grad_clip=0.0)
    cfg.sft.train.update(num_steps=10, log_every=10, checkpoint_every=2, keep_checkpoints=2,
                         eval_every=0)
    with tempfile.TemporaryDirectory() as wd:
      with self.assertRaisesRegex(FloatingPointError, r"^step \d+: ") as raised:
        pipeline.run(cfg, wd)
      failed_at = int(str(raised.exception).split()[1].rstrip(":"))
      ckpt_dir = os.path.join(wd, "sft", "checkpoints")
      steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
      self.assertNotEmpty(steps)  # the good ones are kept (measured: NaN at step 4, saved: 2)
      self.assertLess(max(steps), failed_at)
      self.assertFalse(artifacts.finished(os.path.join(wd, "sft")))
      ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=0)
      mesh = sharding.make_mesh(cfg.mesh)
      from rlhf_jax.models import PolicyModel, TransformerConfig  # pylint: disable=g-import-not-at-top
      from flax import nnx  # pylint: disable=g-import-not-at-top
      model_cfg = TransformerConfig.from_config(dict(cfg.model, vocab_size=259))
      _, abstract = nnx.split(nnx.eval_shape(lambda: PolicyModel(model_cfg, nnx.Rngs(0))))
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract, sharding.param_shardings(abstract, mesh))
      for step in steps:
        params = ckpt.restore_params(abstract, step)
        for leaf in jax.tree.leaves(params):
          self.assertTrue(np.isfinite(np.asarray(leaf)).all(), f"checkpoint {step}")
      ckpt.close()

  def test_failed_rerun_leaves_a_finished_stage_intact(self):
    """A rerun with another network size is refused before anything is written, naming the
    key; the folder stays loadable as `sft_checkpoint`."""
    with tempfile.TemporaryDirectory() as wd:
      _copy_stages(wd, ["sft"])
      before = _snapshot(os.path.join(wd, "sft"))
      cfg = testing.pipeline_config("sft")
      cfg.model.d_model = 96
      with self.assertRaisesRegex(ValueError, r"sft is a finished sft run made with other "
                                  r"settings \(model.d_model: 64 -> 96\); use another "
                                  r"--workdir, or --config.retrain=sft"):
        pipeline.run(cfg, wd)
      cfg = testing.pipeline_config("sft")
      cfg.sft.optim.learning_rate = 0.5
      with self.assertRaisesRegex(ValueError, r"sft.optim.learning_rate: 0.003 -> 0.5"):
        pipeline.run(cfg, wd)
      self.assertEqual(_snapshot(os.path.join(wd, "sft")), before)
      policy = artifacts.load_policy(os.path.join(wd, "sft"), sharding.make_mesh(cfg.mesh))
      self.assertEqual(policy.model_config.d_model, 64)

  def test_retrain_moves_the_old_folders_aside(self):
    with tempfile.TemporaryDirectory() as wd:
      _copy_stages(wd, ["sft", "rm"])
      before = _snapshot(os.path.join(wd, "rm"))
      stage_settings.move_aside(wd, ["rm", "ppo"])  # what --config.retrain=rm does first
      self.assertEqual(sorted(os.listdir(wd)), ["rm.old-1", "sft"])
      self.assertEqual(_snapshot(os.path.join(wd, "rm.old-1")), before)
      shutil.copytree(os.path.join(wd, "rm.old-1"), os.path.join(wd, "rm"))
      stage_settings.move_aside(wd, ["rm"])
      self.assertEqual(sorted(os.listdir(wd)), ["rm.old-1", "rm.old-2", "sft"])

  def test_interrupted_after_the_last_checkpoint_reports_its_metrics(self):
    """Killed between PPO's last checkpoint and its summary: the rerun runs no iteration,
    reports the last iteration's metrics (not NaN) and keeps metrics.jsonl strict JSON."""
    shared, out = testing.shared_pipeline()
    with tempfile.TemporaryDirectory() as wd:
      _copy_stages(wd, ["sft", "rm", "ppo"])
      os.remove(os.path.join(wd, "ppo", artifacts.SUMMARY))
      again = pipeline.run(testing.pipeline_config(), wd)
      self.assertNotIn("loss", {k for r in testing.metric_rows(wd) for k in r})  # no step ran
      rows = _strict_rows(os.path.join(wd, "metrics.jsonl"))
    want = out.stages["ppo"].metrics
    for key in ("objective/kl", "objective/scores", "kl_coef", "final/kl",
                "final/ppo_gold_reward", "final/sft_gold_reward"):
      self.assertEqual(again.metrics[key], want[key], key)
    self.assertLen(rows, 1)  # the summary row
    _strict_rows(os.path.join(shared, "metrics.jsonl"))


class OneLineErrorTest(absltest.TestCase):

  def _main(self, *flags):
    with tempfile.TemporaryDirectory() as wd:
      return subprocess.run(
          [sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo.py:test",
           f"--workdir={wd}", *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
          check=False)

  def test_bad_value_is_one_line_and_exit_1(self):
    out = self._main("--config.ppo.critic=value")
    self.assertEqual(out.returncode, 1)
    self.assertEqual(out.stderr.strip().splitlines()[-1],
                     "error: ValueError: ppo.critic is 'value'; choose one of "
                     "('reward', 'sft', 'shared').")
    self.assertNotIn("Traceback", out.stderr)
    full = self._main("--config.ppo.critic=value", "--verbose_errors")
    self.assertNotEqual(full.returncode, 0)
    self.assertIn("Traceback", full.stderr)


if __name__ == "__main__":
  absltest.main()
