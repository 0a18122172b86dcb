"""SFT: loss against numpy, fixed-shape batching, and the stage end to end."""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from flax import nnx

from rlhf_jax import config as config_lib
from rlhf_jax import sft
from rlhf_jax.data import batching, tasks
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import PolicyModel, TransformerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class SftTest(absltest.TestCase):

  def test_batching_layout(self):
    tok = ByteTokenizer()
    counts = batching.TruncationCounts()
    arr = batching.sft_arrays([{"prompt": "ab", "completion": "xyz"},
                               {"prompt": "0123456", "completion": "q" * 10}], tok, 4, 5, counts)
    self.assertEqual(arr["tokens"].shape, (2, 9))
    # Row 0: two left pads, prompt, completion, EOS, right pad.
    np.testing.assert_array_equal(arr["mask"][0], [0, 0, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(arr["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1, 0])
    self.assertEqual(arr["tokens"][0, 7], tok.eos_id)
    self.assertEqual(tok.decode(arr["tokens"][1, :4]), "3456")  # prompt keeps its end
    self.assertNotIn(tok.eos_id, arr["tokens"][1])  # truncated completion loses EOS
    self.assertEqual((counts.prompts, counts.completions), (1, 1))
    self.assertNotEqual(tok.pad_id, tok.eos_id)
    with self.assertRaisesRegex(ValueError, "record 0: field 'completion'"):
      batching.sft_arrays([{"prompt": "a"}], tok, 4, 4)

  def test_tokenizer_round_trip(self):
    tok = ByteTokenizer()
    text = "sort 3 1 = 1 3 — ünïcode ✓"
    self.assertEqual(tok.decode(tok.encode(text)), text)
    self.assertEqual(tok.decode(tok.encode("ab") + [tok.eos_id] + tok.encode("cd")), "ab")

  def test_loss_matches_numpy(self):
    cfg = TransformerConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, mlp_dim=64)
    model = PolicyModel(cfg, nnx.Rngs(0))
    recs = tasks.SortTask().sft_records(4, seed=3)
    batch = batching.sft_arrays(recs, ByteTokenizer(), 16, 12)
    loss, metrics = jax.jit(sft.sft_loss)(model, batch)

    logits = np.asarray(model(batch["tokens"], batch["mask"])[0], np.float64)
    logp = _np_log_softmax(logits)
    total, n = 0.0, 0
    for b in range(4):
      for t in range(batch["tokens"].shape[1] - 1):
        if batch["loss_mask"][b, t + 1]:
          total -= logp[b, t, batch["tokens"][b, t + 1]]
          n += 1
    np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), n)

  def test_gold_reward(self):
    task = tasks.SortTask()
    self.assertEqual(task.gold_reward("sort 3 1 2 =", " 1 2 3"), 1.0)
    self.assertAlmostEqual(task.gold_reward("sort 3 1 2 =", " 1 3 2"), 1 / 3)
    self.assertAlmostEqual(task.gold_reward("sort 3 1 2 =", " 1 2"), 2 / 3 - 1 / 3)

  def test_short_run_learns_and_writes_metrics(self):
    cfg = config_lib.sft_config("test")
    with tempfile.TemporaryDirectory() as wd:
      result = sft.run(cfg, wd)
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    self.assertEqual(rows[0]["step"], 1)
    self.assertEqual(rows[-1]["step"], cfg.train.num_steps)
    self.assertLess(rows[-1]["loss"], 0.6 * rows[0]["loss"])
    self.assertIn("eval_loss", result["metrics"])
    self.assertTrue(np.isfinite(result["metrics"]["eval_loss"]))

  def test_non_finite_loss_stops_the_run(self):
    cfg = config_lib.sft_config("test")
    cfg.optim.learning_rate = 1e30
    cfg.optim.grad_clip = 0.0
    cfg.train.num_steps = 5
    cfg.train.log_every = 1
    with self.assertRaisesRegex(FloatingPointError, r"step \d+: loss is nan"):
      sft.run(cfg, None)

  def test_main_entry_point(self):
    with tempfile.TemporaryDirectory() as wd:
      out = subprocess.run(
          [sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo.py:test",
           f"--workdir={wd}", "--config.train.num_steps=4", "--config.train.log_every=2"],
          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])
      final = json.loads(out.stdout.strip().splitlines()[-1])
      self.assertEqual(final["stage"], "sft")
      self.assertTrue(os.path.exists(os.path.join(wd, "config_sft.json")))
      bad = subprocess.run(
          [sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo.py:test",
           "--config.optim.learnig_rate=1"], cwd=REPO, capture_output=True, text=True,
          timeout=300, check=False)
      self.assertNotEqual(bad.returncode, 0)
      self.assertIn("learnig_rate", bad.stderr)


if __name__ == "__main__":
  absltest.main()
