"""SFT: loss against numpy, fixed-shape batching, and the stage end to end."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import testing
from rlhf_jax import artifacts, pipeline
from rlhf_jax.stages import sft
from rlhf_jax.data import batching, sources, tasks
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
    with self.assertRaisesRegex(ValueError, "record 1: field 'completion'"):
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

  def test_accuracy_and_gradient_match_reference(self):
    """Token accuracy against numpy argmax (on a batch where about half the targets are the
    model's own argmax), and the gradient against the plain loss on whole-sequence logits."""
    cfg = TransformerConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, mlp_dim=64, init_std=0.3)
    model = PolicyModel(cfg, nnx.Rngs(1))
    batch = batching.sft_arrays(tasks.SortTask().sft_records(4, seed=5), ByteTokenizer(), 16, 12)
    tokens = batch["tokens"].copy()
    fwd = jax.jit(lambda t: model(t, batch["mask"])[0])
    rng = np.random.default_rng(5)
    for t in range(tokens.shape[1] - 1):  # causal: later tokens never change logits[:, t]
      pick = rng.random(len(tokens)) < 0.5
      tokens[pick, t + 1] = np.asarray(fwd(tokens))[pick, t].argmax(-1)
    batch = dict(batch, tokens=tokens)
    graphdef, params = nnx.split(model)

    def plain(model, batch):
      logits = model(batch["tokens"], batch["mask"])[0][:, :-1]
      w = batch["loss_mask"][:, 1:]
      logp = jax.nn.log_softmax(logits)
      ce = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
      return (ce * w).sum() / w.sum(), {}

    grad = jax.jit(jax.value_and_grad(lambda p, f: f(nnx.merge(graphdef, p), batch),
                                      has_aux=True), static_argnums=1)
    (loss, metrics), g = grad(params, sft.sft_loss)
    (want_loss, _), want_g = grad(params, plain)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)

    logits = np.asarray(fwd(tokens), np.float64)[:, :-1]
    w = batch["loss_mask"][:, 1:].astype(bool)
    correct = logits.argmax(-1) == tokens[:, 1:]
    want_acc = correct[w].mean()
    self.assertBetween(want_acc, 0.2, 0.8)  # not vacuous
    self.assertAlmostEqual(float(metrics["token_accuracy"]), want_acc, places=6)

  def test_gold_reward(self):
    task = tasks.SortTask()
    self.assertEqual(task.gold_reward("sort 3 1 2 =", " 1 2 3"), 1.0)
    self.assertAlmostEqual(task.gold_reward("sort 3 1 2 =", " 1 3 2"), 1 / 3)
    self.assertAlmostEqual(task.gold_reward("sort 3 1 2 =", " 1 2"), 2 / 3 - 1 / 3)

  def _config(self, **train):
    cfg = testing.pipeline_config("sft")  # the shared pipeline's SFT (tests/testing.py)
    cfg.sft.train.update(train)
    return cfg

  def test_short_run_learns_and_writes_metrics(self):
    workdir, out = testing.shared_pipeline()
    cfg, result = self._config(), out.stages["sft"]
    rows = testing.metric_rows(workdir, "sft")
    self.assertTrue(os.listdir(os.path.join(workdir, "tensorboard", "sft")))
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "sft", "checkpoints"))),
                     ["20", "30"])
    self.assertEqual(rows[0]["step"], 1)
    self.assertEqual(rows[-1]["step"], cfg.sft.train.num_steps)
    self.assertLess(rows[-1]["loss"], 0.6 * rows[0]["loss"])
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    self.assertLen(evals, 3)  # steps 10, 20, 30
    self.assertLess(evals[-1], 0.8 * evals[0])
    m = result.metrics
    self.assertAlmostEqual(m["eval_perplexity"], np.exp(m["eval_loss"]), places=3)
    self.assertBetween(m["gold/reward"], -10.0, 1.0)
    self.assertEqual(artifacts.read_summary(os.path.join(workdir, "sft")), m)

  def test_resume_is_exact(self):
    """N steps, stop, resume to 3N == the shared pipeline's 3N uninterrupted steps: same
    metrics, same parameters."""
    n = 10
    workdir, out = testing.shared_pipeline()
    full = out.stages["sft"]
    self.assertEqual(self._config().sft.train.num_steps, 3 * n)
    with tempfile.TemporaryDirectory() as b:
      first = pipeline.run(self._config(num_steps=n, checkpoint_every=n), b)
      self.assertFalse(artifacts.finished(os.path.join(b, "sft"), 3 * n))
      resumed = pipeline.run(self._config(checkpoint_every=n), b).stages["sft"]
      rows = {"full": {r["step"]: r for r in testing.metric_rows(workdir, "sft")},
              "resumed": {r["step"]: r for r in testing.metric_rows(b, "sft")}}
    self.assertEqual(int(first.stages["sft"].state.step), n)
    self.assertEqual(int(resumed.state.step), 3 * n)
    common = sorted(set(rows["full"]) & set(rows["resumed"]))
    self.assertContainsSubset([1, n, 2 * n, 3 * n], common)
    for step in common:
      for key, value in rows["full"][step].items():
        if key != "tokens_per_s" and key in rows["resumed"][step]:
          self.assertEqual(value, rows["resumed"][step][key], f"step {step} {key}")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                 jax.device_get(resumed.state.params))

  def test_trains_from_jsonl_and_tfds(self):
    task = tasks.SortTask()
    with tempfile.TemporaryDirectory() as wd:
      paths = {}
      for split, seed in (("train", 0), ("eval", 1)):
        paths[split] = os.path.join(wd, f"{split}.jsonl")
        sources.write_jsonl(paths[split], task.sft_records(64, seed), "sft")
      subprocess.run([sys.executable, "-m", "rlhf_jax.data.tfds_builder", "--schema=sft",
                      f"--data_dir={wd}/tfds", "--name=sorted", f"train={paths['train']}",
                      f"eval={paths['eval']}"], check=True, capture_output=True, cwd=REPO)
      for source in (dict(train_path=paths["train"], eval_path=paths["eval"]),
                     dict(tfds_name="sorted", tfds_data_dir=f"{wd}/tfds")):
        cfg = self._config(num_steps=3, eval_every=3)
        cfg.sft.data.update(source)
        metrics = pipeline.run(cfg, None).metrics
        self.assertTrue(np.isfinite(metrics["loss"]))
        self.assertIn("eval_loss", metrics)
        self.assertNotIn("gold/reward", metrics)  # no gold reward for user data

  def test_non_finite_loss_stops_the_run(self):
    cfg = self._config(num_steps=5, log_every=1)
    cfg.sft.optim.learning_rate = 1e30
    cfg.sft.optim.grad_clip = 0.0
    with self.assertRaisesRegex(FloatingPointError, r"step \d+: (loss|grad_norm) is nan"):
      pipeline.run(cfg, None)

  def test_bad_inputs_name_the_problem(self):
    with tempfile.TemporaryDirectory() as wd:
      path = os.path.join(wd, "train.jsonl")
      with open(path, "w") as f:
        f.write('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
      cfg = self._config()
      cfg.sft.data.update(train_path=path, eval_path=path)
      with self.assertRaisesRegex(ValueError, "train.jsonl:2: malformed JSON"):
        pipeline.run(cfg, wd)
      with open(path, "w") as f:
        f.write('{"prompt": "a", "completion": ""}\n')
      with self.assertRaisesRegex(ValueError, "train.jsonl:1: field 'completion' is an empty"):
        pipeline.run(cfg, wd)
    cfg = self._config()
    cfg.data.update(truncation="error", max_completion_len=4)
    with self.assertRaisesRegex(ValueError, r"task:sort/train: record 1: completion is \d+ "
                                r"tokens, over the limit 4 \(data.max_completion_len\)"):
      pipeline.run(cfg, None)
    with self.assertRaisesRegex(ValueError, "did you mean 'learning_rate'"):
      from rlhf_jax.train import optim  # pylint: disable=g-import-not-at-top
      optim.make_optimizer({"learnig_rate": 1.0, "learning_rate": 1.0, "decay_steps": 10})

  def test_main_entry_point(self):
    """The README's main job, `configs/ppo.py`, on a copy of the shared pipeline's workdir:
    SFT and RM are reused, PPO runs 2 iterations, and the final metrics are printed."""
    shared, _ = testing.shared_pipeline()
    with tempfile.TemporaryDirectory() as wd:
      for stage in ("sft", "rm"):
        shutil.copytree(os.path.join(shared, stage), os.path.join(wd, stage))
      flags = [f"--config.{k}={v}" for k, v in testing.PIPELINE_OVERRIDES.items()]
      out = subprocess.run(
          [sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo.py:test",
           f"--workdir={wd}", "--config.ppo.num_iterations=2",
           "--config.ppo.data.num_eval_prompts=16", *flags],
          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])
      final = json.loads(out.stdout.strip().splitlines()[-1])
      self.assertEqual(final["stage"], "ppo")
      for key in ("final/sft_gold_reward", "final/ppo_gold_reward", "final/kl",
                  "rm/eval_accuracy"):
        self.assertIn(key, final)
      self.assertIn("reusing the finished SFT policy", out.stderr)
      self.assertIn("reusing the finished reward model", out.stderr)
      for path in ("config_ppo.json", "ppo/summary.json"):
        self.assertTrue(os.path.exists(os.path.join(wd, path)), path)
      bad = subprocess.run(
          [sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo.py:test",
           "--config.ppo.optim.learnig_rate=1"], cwd=REPO, capture_output=True, text=True,
          timeout=300, check=False)
      self.assertNotEqual(bad.returncode, 0)
      self.assertIn('Did you mean "learning_rate"', bad.stderr)

  def test_main_compilation_cache_setting(self):
    from rlhf_jax import main  # pylint: disable=g-import-not-at-top
    keys = ("jax_compilation_cache_dir", "jax_enable_compilation_cache")
    before = {k: getattr(jax.config, k) for k in keys}
    try:
      with tempfile.TemporaryDirectory() as wd:
        jax.config.update("jax_compilation_cache_dir", None)
        main._use_compilation_cache("", wd)  # pylint: disable=protected-access
        self.assertEqual(jax.config.jax_compilation_cache_dir, os.path.join(wd, "jax_cache"))
        jax.config.update("jax_compilation_cache_dir", "/from/env")  # JAX_COMPILATION_CACHE_DIR
        main._use_compilation_cache("", wd)  # pylint: disable=protected-access
        self.assertEqual(jax.config.jax_compilation_cache_dir, "/from/env")
        main._use_compilation_cache("~/jc", wd)  # pylint: disable=protected-access
        self.assertEqual(jax.config.jax_compilation_cache_dir, os.path.expanduser("~/jc"))
        main._use_compilation_cache("off", wd)  # pylint: disable=protected-access
        self.assertFalse(jax.config.jax_enable_compilation_cache)
    finally:
      for k, v in before.items():
        jax.config.update(k, v)


if __name__ == "__main__":
  absltest.main()
