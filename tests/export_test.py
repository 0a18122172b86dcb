"""Hugging Face export (`rlhf_jax.export`): transformers loads what it writes and computes
what our networks compute.

Stage folders are built here as the stages leave them (an orbax checkpoint of random params,
`model_config.json`, `tokenizer.json`, `settings.json`, `summary.json`), not trained: the
export reads files, and random weights (norm scales and biases included) make every tensor
matter. transformers is the reference: its logits and scores must equal ours to 1e-4 in
float32, and our importer must read the export back to the same bits.
"""

import contextlib
import dataclasses
import io
import errno
import json
import os
import shutil
import tempfile
import types
from unittest import mock

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from flax import nnx

from pretrained_test import write_chatml_tokenizer
from rlhf_jax import artifacts, export
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.models import (ActorCritic, PolicyModel, RewardModel, TransformerConfig,
                             ValueModel, hf_export, pretrained)
from rlhf_jax.models.config import MoEConfig, RopeScaling
from rlhf_jax.train import checkpoint

VOCAB = 320  # above the byte (259), SentencePiece (300) and ChatML BPE (~300) vocabularies


def tiny_config(**kw) -> TransformerConfig:
  return TransformerConfig(**{**dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, mlp_dim=48, rms_norm_eps=1e-5,
                                     rope_theta=500.0), **kw})


def make_tokenizer(kind: str, directory: str):
  if kind == "byte":
    return tokenizer_lib.ByteTokenizer()
  if kind == "sentencepiece":
    texts = ["the cat sat on the mat. Hello, world!", "naïve café 12 apples\ttabs\n"] * 40
    path = tokenizer_lib.train_sentencepiece(texts, os.path.join(directory, "spm"), 300,
                                             hard_vocab_limit=False)
    return tokenizer_lib.SentencePieceTokenizer(path)
  write_chatml_tokenizer(os.path.join(directory, "hf_tok"))  # pad declared = EOS: replaced
  return tokenizer_lib.get_tokenizer("hf", None, None, 0, os.path.join(directory, "hf_tok"),
                                     chat=True)


def write_stage(workdir: str, stage: str, cfg: TransformerConfig, params: nnx.State, tok,
                normalization=None, step: int = 3, **settings) -> str:
  """A finished `<workdir>/<stage>` holding `params` at `step`, laid out as the stage writes
  it (the RL stages keep no model config or tokenizer: the SFT run's, found through their
  `settings.json`, whose other keys are `settings`)."""
  folder = os.path.join(workdir, stage)
  ckpt = checkpoint.Checkpointer(os.path.join(folder, "checkpoints"), save_every=1)
  state = types.SimpleNamespace(params=params, step=np.int32(step),
                                opt_state={"mu": np.zeros((2,), np.float32)})
  ckpt.maybe_save(step, state, {"step": step}, force=True)
  ckpt.close()
  if stage in ("sft", "rm"):
    extra = {"normalization": normalization} if normalization else {}
    artifacts.save_network(folder, cfg, tok, {"final": 1.0}, **extra)
  else:
    with open(os.path.join(folder, "settings.json"), "w") as f:
      json.dump({"sft_checkpoint": "", "init_from": "", **settings}, f)
    with open(os.path.join(folder, artifacts.SUMMARY), "w") as f:
      json.dump({"final": 1.0}, f)
  return folder


def random_network(create, seed: int):
  """(graphdef, state, pure dict) of `create()` with every parameter drawn as in
  `testing.random_state` (norm scales 1 + 0.2 N(0, 1), the rest, biases included,
  0.2 N(0, 1)), but as float32 numpy: casting on device would compile a conversion per
  shape, most of this file's compile time."""
  graphdef, state = nnx.split(nnx.eval_shape(create))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    z = rng.standard_normal(x.shape).astype(np.float32)
    return 1.0 + 0.2 * z if path[-1].key == "scale" else 0.2 * z

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return graphdef, state, pure


def batch(mask_rows, t: int, pad_id: int, seed: int = 0):
  """Tokens [B, T] (pad_id where mask is 0, never elsewhere) and mask [B, T] from row masks."""
  rng = np.random.default_rng(seed)
  mask = np.array(mask_rows, np.int32)
  tokens = rng.integers(3, VOCAB, size=(len(mask), t)).astype(np.int32)
  tokens[tokens == pad_id] = pad_id + 1
  return np.where(mask == 1, tokens, pad_id).astype(np.int32), mask


def left_right_masks(t: int):
  return [[0] * (t - 9) + [1] * 9, [1] * t, [1] * 5 + [0] * (t - 5)]


def torch_inputs(tokens, mask):
  """transformers' inputs with our position ids (it numbers positions 0.. from the start of
  the row, pads included, unless told)."""
  import torch  # pylint: disable=g-import-not-at-top
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  return {"input_ids": torch.tensor(tokens, dtype=torch.long),
          "attention_mask": torch.tensor(mask, dtype=torch.long),
          "position_ids": torch.tensor(positions, dtype=torch.long)}


def run_cli(*argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = export.main(list(argv))
    except SystemExit as e:  # argparse
      code = e.code
  return code, out.getvalue(), err.getvalue()


class ExportTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir)
    self.workdir = os.path.join(self.dir, "work")

  @parameterized.named_parameters(
      # PPO: the checkpoint is the actor-critic; untied head, GQA, LLaMA 3 RoPE, bytes, and
      # 40 kB files, so the weights are split into shards with an index.
      ("ppo_untied_gqa_llama3_byte_sharded", "ppo", "byte", 40e3 / 1e9,
       dict(rope_scaling=RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16))),
      ("sft_tied_mqa_linear_spm", "sft", "sentencepiece", 5,
       dict(tie_embeddings=True, num_kv_heads=1,
            rope_scaling=RopeScaling(kind="linear", factor=2.0))),
      ("grpo_qwen2_hf_chat", "grpo", "hf", 5, dict(qkv_bias=True)),
  )
  def test_policy_round_trip(self, stage, tok_kind, shard_gb, overrides):
    import transformers  # pylint: disable=g-import-not-at-top
    cfg = tiny_config(**overrides)
    tok = make_tokenizer(tok_kind, self.dir)
    if stage == "ppo":  # the checkpoint is the actor-critic (here with a separate critic)
      ac_graphdef, ac_state, ac_pure = random_network(lambda: ActorCritic(
          PolicyModel(cfg, nnx.Rngs(0)), critic=ValueModel(cfg, nnx.Rngs(1))), seed=1)
      graphdef, state = nnx.split(nnx.merge(ac_graphdef, ac_state).policy)
      pure = ac_pure["policy"]
      # Its SFT run in another workdir, named by `sft_checkpoint`.
      sft = write_stage(os.path.join(self.dir, "elsewhere"), "sft", cfg, state, tok)
      write_stage(self.workdir, "ppo", cfg, ac_state, tok, sft_checkpoint=sft)
    else:
      graphdef, state, pure = random_network(lambda: PolicyModel(cfg, nnx.Rngs(0)), seed=1)
      write_stage(self.workdir, "sft", cfg, state, tok)
    if stage == "grpo":  # started from a pretrained checkpoint: its context length is kept
      source = os.path.join(self.dir, "pretrained")
      os.makedirs(source)
      with open(os.path.join(source, "config.json"), "w") as f:
        json.dump({"max_position_embeddings": 96}, f)
      write_stage(self.workdir, stage, cfg, state, tok, init_from=source)
    out = os.path.join(self.dir, "hf")
    code, printed, err = run_cli("--workdir", self.workdir, "--stage", stage, "--out", out,
                                 "--max_shard_gb", str(shard_gb))
    self.assertEqual((code, err), (0, ""), printed)
    self.assertIn(f"tokenizer ({tok_kind}) checked: transformers", printed)
    self.assert_shards(out, sharded=shard_gb < 1)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    self.assertEqual(type(hf).__name__, arch)
    self.assert_same_logits(hf, graphdef, state, cfg, tok.pad_id)
    with open(os.path.join(out, "config.json")) as f:
      config = json.load(f)
    self.assertEqual((config["pad_token_id"], config["eos_token_id"], config["torch_dtype"]),
                     (tok.pad_id, tok.eos_id, "float32"))
    self.assertEqual(config["num_key_value_heads"], cfg.num_kv_heads)
    self.assertEqual(config["max_position_embeddings"], 96 if stage == "grpo" else 2048)
    # Our importer reads the export back (as `init_from` does) to the same config and bits.
    again_cfg, again = pretrained.read(out)
    self.assertEqual(again_cfg, dataclasses.replace(cfg, head_dim=cfg.resolved_head_dim))
    jax.tree.map(np.testing.assert_array_equal, again, pure)
    self.assert_tokenizer_matches(out, tok)

  def assert_shards(self, out, sharded):
    files = os.listdir(out)
    shards = sorted(f for f in files if f.startswith("model-"))
    if not sharded:
      self.assertEqual((shards, "model.safetensors" in files), ([], True))
      return
    self.assertGreater(len(shards), 3)
    self.assertEqual(shards[0], f"model-00001-of-{len(shards):05d}.safetensors")
    self.assertNotIn("model.safetensors", files)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
      self.assertEqual(sorted(set(json.load(f)["weight_map"].values())), shards)

  def assert_same_logits(self, hf, graphdef, state, cfg, pad_id):
    import torch  # pylint: disable=g-import-not-at-top
    t = 24  # long enough for the scaled RoPE frequencies to matter
    tokens, mask = batch(left_right_masks(t), t, pad_id)
    with torch.no_grad():
      want = hf(**torch_inputs(tokens, mask)).logits.numpy()
    got = np.asarray(jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0])(state, tokens, mask))
    real = mask.astype(bool)
    self.assertGreater(want[real].std(), 0.3)  # logits that differ, so the check means something
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)

  def assert_tokenizer_matches(self, out, tok):
    import transformers  # pylint: disable=g-import-not-at-top
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    self.assertEqual((hf_tok.pad_token_id, hf_tok.eos_token_id), (tok.pad_id, tok.eos_id))
    for text in ("the cat sat on the mat", "Hello,  world!\n12 naïve\tcafé 😀", ""):
      self.assertEqual(hf_tok.encode(text, add_special_tokens=False), tok.encode(text))
      self.assertEqual(hf_tok.decode(tok.encode(text)), text)
    if getattr(tok, "chat", False):
      ids = hf_tok.apply_chat_template([{"role": "user", "content": "the cat"}],
                                       add_generation_prompt=True, return_dict=False)
      self.assertEqual(ids, tok.encode_prompt("the cat"))

  def test_reward_model(self):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    cfg = tiny_config()
    tok = tokenizer_lib.ByteTokenizer()
    graphdef, state, pure = random_network(lambda: RewardModel(cfg, nnx.Rngs(0)), seed=3)
    self.assertNotEqual(float(pure["reward_head"]["b_1"][0]), 0.0)  # the bias must be carried
    write_stage(self.workdir, "rm", cfg, state, tok, normalization={"gain": 1.5, "bias": -0.25})
    out = os.path.join(self.dir, "hf_rm")
    export.export(self.workdir, "rm", out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    self.assertEqual((type(hf).__name__, hf.config.num_labels),
                     ("LlamaForSequenceClassification", 1))
    with open(os.path.join(out, "reward_normalization.json")) as f:
      norm = json.load(f)
    self.assertEqual((norm["gain"], norm["bias"]), (1.5, -0.25))
    t = 16
    tokens, mask = batch(left_right_masks(t), t, tok.pad_id, seed=4)
    ours = np.asarray(jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(state, tokens, mask))
    self.assertGreater(ours.std(), 0.1)
    with torch.no_grad():
      # transformers reads the last token that is not pad_token_id, so left (row 0) and right
      # (row 2) padding both work. Used as it comes, it numbers positions from the start of
      # the row, pads included; RoPE scores depend on relative positions only, so a
      # left-padded row still scores as ours does (mask-derived position ids).
      theirs = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(theirs.numpy()[:, 0] + norm["head_bias"], ours, rtol=0, atol=1e-4)

  def test_tokenizer_transformers_cannot_match_is_left_out_and_said(self):
    """A SentencePiece model with an NFKC normaliser: LlamaTokenizer has none, so the export
    holds the model without a tokenizer, and says why."""
    path = tokenizer_lib.train_sentencepiece(
        ["the cat sat on the mat. Hello, world!"] * 40, os.path.join(self.dir, "nfkc"), 300,
        hard_vocab_limit=False, normalization_rule_name="nmt_nfkc")
    tok = tokenizer_lib.SentencePieceTokenizer(path)
    cfg = tiny_config()
    write_stage(self.workdir, "sft", cfg,
                random_network(lambda: PolicyModel(cfg, nnx.Rngs(0)), seed=6)[1], tok)
    out = os.path.join(self.dir, "hf")
    lines = export.export(self.workdir, "sft", out)
    self.assertEqual(lines[2], "tokenizer (sentencepiece): none")
    self.assertRegex(lines[3], "^tokenizer \\(sentencepiece\\) NOT written: its normaliser is "
                     "'nmt_nfkc'.*LlamaTokenizer applies none")
    self.assertEqual(sorted(os.listdir(out)),
                     ["config.json", "generation_config.json", "model.safetensors"])

  def test_bad_input_is_one_line_and_writes_nothing(self):
    cfg = tiny_config()
    tok = tokenizer_lib.ByteTokenizer()
    state = random_network(lambda: PolicyModel(cfg, nnx.Rngs(0)), seed=5)[1]
    write_stage(self.workdir, "sft", cfg, state, tok)
    os.makedirs(os.path.join(self.workdir, "ppo"))  # started, never finished
    dpo = write_stage(self.workdir, "dpo", cfg, state, tok)
    shutil.rmtree(os.path.join(dpo, "checkpoints", "3", "params"))  # the final params damaged
    moe_cfg = tiny_config(moe=MoEConfig(num_experts=4, moe_every=2))
    # Refused from its model config, before any checkpoint is read.
    artifacts.save_network(os.path.join(self.dir, "moe", "sft"), moe_cfg, tok, {"final": 1.0})
    out = os.path.join(self.dir, "hf")
    taken = os.path.join(self.dir, "taken")
    os.makedirs(taken)
    with open(os.path.join(taken, "keep.txt"), "w") as f:
      f.write("x")
    missing = os.path.join(self.dir, "nowhere")
    cases = [
        ((missing, "sft", out), f"--workdir {missing} does not exist"),
        ((self.workdir, "rm", out),
         r"--stage rm: .*/rm does not exist \(finished stages there: sft, dpo\)"),
        ((self.workdir, "ppo", out), "--stage ppo: .*/ppo is an unfinished run"),
        ((self.workdir, "dpo", out), "dpo/checkpoints/3/params: the final checkpoint is damaged"),
        ((self.workdir, "best_of_n", out), "--stage best_of_n trains no network"),
        ((self.workdir, "preferences", out), "--stage 'preferences' is not a stage"),
        ((os.path.join(self.dir, "moe"), "sft", out), "is a sparse MoE .*num_experts=4"),
        ((self.workdir, "sft", taken), f"--out {taken} already exists and is not empty"),
    ]
    for (workdir, stage, dest), want in cases:
      code, printed, err = run_cli("--workdir", workdir, "--stage", stage, "--out", dest)
      self.assertEqual((code, printed), (1, ""), err)
      self.assertRegex(err, f"^error: [A-Za-z]+: .*{want}")
      self.assertEqual(err.count("\n"), 1, err)
    code, _, err = run_cli("--workdir", self.workdir, "--stage", "sft", "--out", out,
                           "--max_shard_gb", "0")
    self.assertEqual((code, err),
                     (1, "error: ValueError: --max_shard_gb must be positive, got 0.0.\n"))
    # A full disk while writing: one line naming the file, and no partial --out.
    with mock.patch.object(hf_export, "save_file",
                           side_effect=OSError(errno.ENOSPC, "No space left on device")):
      code, _, err = run_cli("--workdir", self.workdir, "--stage", "sft", "--out", out)
    self.assertEqual(code, 1)
    self.assertRegex(err, "^error: OSError: no space left on device / file too large: "
                     f"{out}.tmp-[0-9a-f]+/model.safetensors; free space there .*\n$")
    code, _, err = run_cli("--stage", "sft")
    self.assertEqual(code, 2)
    self.assertRegex(err, "^error: the following arguments are required: --workdir, --out .*\n$")
    self.assertFalse(os.path.exists(out))
    self.assertEqual(os.listdir(taken), ["keep.txt"])
    # No temporary folder left behind.
    self.assertEqual(sorted(os.listdir(self.dir)), ["moe", "taken", "work"])
    # --overwrite replaces a previous export.
    code, _, err = run_cli("--workdir", self.workdir, "--stage", "sft", "--out", taken,
                           "--overwrite")
    self.assertEqual((code, err), (0, ""))
    self.assertIn("config.json", os.listdir(taken))
    self.assertNotIn("keep.txt", os.listdir(taken))


if __name__ == "__main__":
  absltest.main()
