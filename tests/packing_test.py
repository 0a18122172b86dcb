"""Packed SFT rows (`data/packing.py`): the packer's order, coverage and resume, and that a
packed batch trains exactly like the same examples unpacked (loss, gradients, logits).

The references are independent of the packed code path: the unpacked batch through the
model's default (mask-derived) attention and positions, and a plain first-fit written here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from flax import nnx

import testing
from rlhf_jax import config as config_lib, pipeline, validate
from rlhf_jax.data import batching, packing
from rlhf_jax.data.tokenizer import ByteTokenizer
from rlhf_jax.models import PolicyModel, TransformerConfig, transformer
from rlhf_jax.stages import sft

TOK = ByteTokenizer()
P, C = 8, 8  # prompt and completion lengths: rows of 16 tokens


def _records(n: int, seed: int) -> list[dict[str, str]]:
  """Prompts of 1-7 and completions of 0-6 letters: examples of 2-14 tokens (with EOS), so
  rows of 16 hold one to several, and some prompts fill `P` (no left pad)."""
  rng = np.random.default_rng(seed)
  word = lambda k: "".join(rng.choice(list("abcdefghij"), size=k))
  return [{"prompt": word(rng.integers(1, P)), "completion": word(rng.integers(0, C - 1))}
          for _ in range(n)]


def _packed_all(arrays):
  """(batch, rows): every example of `arrays` packed first-fit in order, in one batch, and
  the example indices of each row."""
  starts, lengths = packing.example_spans(arrays["mask"])
  row_of = packing.first_fit(lengths, P + C)
  rows = [np.flatnonzero(row_of == r) for r in range(row_of.max() + 1)]
  return packing.build_rows(arrays, starts, lengths, rows, TOK.pad_id), rows


def _model(seed: int = 0):
  """A 2-layer policy with random weights and norm scales (`testing.random_state`)."""
  cfg = TransformerConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, mlp_dim=48)
  graphdef, state, _ = testing.random_state(lambda: PolicyModel(cfg, nnx.Rngs(0)), seed)
  return graphdef, state


def _naive_first_fit(lengths, row_len):
  """The reference: each example scans the rows opened so far for the first with room."""
  free = []
  out = []
  for n in lengths:
    r = next((i for i, f in enumerate(free) if f >= n), len(free))
    if r == len(free):
      free.append(row_len)
    free[r] -= n
    out.append(r)
  return out


class PackingTest(absltest.TestCase):

  def test_packed_loss_and_grads_equal_unpacked(self):
    """The token mean over a packed batch = over the same examples unpacked in one batch,
    gradients too. With loss_on="all" the unpacked reference drops each example's first
    token, which a packed row has nothing before to predict from (module docstring)."""
    graphdef, state = _model()
    grad = jax.jit(jax.value_and_grad(lambda s, b: sft.sft_loss(nnx.merge(graphdef, s), b),
                                      has_aux=True))
    for loss_on in ("completion", "all"):
      unpacked = batching.sft_arrays(_records(12, 0), TOK, P, C, loss_on=loss_on)
      packed, _ = _packed_all(unpacked)
      self.assertLess(len(packed["tokens"]), 8)  # really packed: 12 examples in fewer rows
      self.assertGreater(packed["segment_ids"].max(), 2)
      if loss_on == "all":
        starts, _ = packing.example_spans(unpacked["mask"])
        unpacked["loss_mask"][np.arange(12), starts] = 0
      (want, want_m), want_g = grad(state, unpacked)
      (got, got_m), got_g = grad(state, packed)
      np.testing.assert_allclose(float(got), float(want), rtol=2e-6, err_msg=loss_on)
      self.assertEqual(float(got_m["num_tokens"]), float(want_m["num_tokens"]))
      self.assertEqual(float(got_m["token_accuracy"]), float(want_m["token_accuracy"]))
      for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                   err_msg=loss_on)
    # The row statistics of both layouts.
    lengths, rows = unpacked["mask"].sum(1), len(packed["tokens"])
    np.testing.assert_allclose(float(want_m["padding_fraction"]), 1 - lengths.mean() / (P + C),
                               rtol=1e-6)
    self.assertEqual(float(want_m["examples_per_row"]), 1.0)
    np.testing.assert_allclose(float(got_m["padding_fraction"]),
                               1 - lengths.sum() / (rows * (P + C)), rtol=1e-6)
    np.testing.assert_allclose(float(got_m["examples_per_row"]), 12 / rows, rtol=1e-6)

  def test_each_packed_example_has_its_own_logits(self):
    """Logits of every example inside a packed row = its logits alone, in its left-padded
    unpacked row (equal to the unpadded example's: models_test): no attention across examples
    or to padding. RoPE scores depend on position differences only, so the restarting
    positions are checked on the arrays."""
    unpacked = batching.sft_arrays(_records(6, 1), TOK, P, C)
    packed, rows = _packed_all(unpacked)
    graphdef, state = _model(seed=1)

    @jax.jit
    def logits(s, tokens, mask, seg=None, pos=None):
      model = nnx.merge(graphdef, s)
      h, _ = model.trunk(tokens, mask, segment_ids_BxT=seg, positions_BxT=pos)
      return model.logits(h)

    got = np.asarray(logits(state, packed["tokens"], packed["mask"], packed["segment_ids"],
                            packed["positions"]))
    padded = np.asarray(logits(state, unpacked["tokens"], unpacked["mask"]))
    starts, lengths = packing.example_spans(unpacked["mask"])
    for r, examples in enumerate(rows):
      at = 0
      for seg, i in enumerate(examples, start=1):
        real = slice(starts[i], starts[i] + lengths[i])
        here = slice(at, at + lengths[i])
        at += lengths[i]
        np.testing.assert_array_equal(packed["tokens"][r, here], unpacked["tokens"][i, real])
        np.testing.assert_array_equal(packed["segment_ids"][r, here], seg)
        np.testing.assert_array_equal(packed["positions"][r, here], np.arange(lengths[i]))
        np.testing.assert_allclose(got[r, here], padded[i, real], rtol=1e-5, atol=1e-5)
      self.assertEqual(packed["mask"][r].sum(), at)
      self.assertFalse(packed["segment_ids"][r, at:].any())
    self.assertLess(len(packed["tokens"]), 6)

  def test_one_segment_per_row_is_bit_identical_to_no_segments(self):
    """Segment ids that put each row's real tokens in one segment, with the mask's positions,
    give exactly the default forward (which models_test checks against numpy and Hugging
    Face); segment ids are refused with a KV cache."""
    graphdef, state = _model(seed=2)
    tokens, mask = testing.left_padded_batch(np.random.default_rng(2), [9, 4, 1], 9,
                                             TOK.vocab_size)
    fwd = jax.jit(lambda s, t, m, **kw: nnx.merge(graphdef, s).trunk(t, m, **kw)[0])
    want = fwd(state, tokens, mask)
    got = fwd(state, tokens, mask, segment_ids_BxT=mask,
              positions_BxT=transformer.positions_from_mask(mask))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    model = nnx.merge(graphdef, state)
    cache = transformer.init_cache(model.cfg, 3, 12)
    with self.assertRaisesRegex(ValueError, "KV cache"):
      model.trunk(tokens, mask, cache, segment_ids_BxT=mask, positions_BxT=mask)
    with self.assertRaisesRegex(ValueError, "needs positions_BxT"):
      model.trunk(tokens, mask, segment_ids_BxT=mask)

  def test_first_fit_and_epoch_coverage(self):
    """first_fit = a plain first-fit; an epoch holds every example exactly once, in rows
    that never exceed the row length."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 17, size=300)
    np.testing.assert_array_equal(packing.first_fit(lengths, 16),
                                  _naive_first_fit(lengths.tolist(), 16))
    for epoch in (0, 1):
      rows = packing.pack_epoch(lengths, 16, seed=5, epoch=epoch)
      np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(300))
      self.assertLessEqual(max(lengths[r].sum() for r in rows), 16)
    self.assertFalse(np.array_equal(np.concatenate(packing.pack_epoch(lengths, 16, 5, 0)),
                                    np.concatenate(packing.pack_epoch(lengths, 16, 5, 1))))
    with self.assertRaisesRegex(ValueError, "example 0 has 17 tokens"):
      packing.first_fit(np.array([17]), 16)

  def test_iterator_stream_resume_and_processes(self):
    """Batches are the epochs' rows back to back (none dropped, a batch may straddle two
    epochs); a fresh iterator set to a position continues exactly; two processes' blocks make
    the one-process batch."""
    arrays = batching.sft_arrays(_records(40, 4), TOK, P, C)
    it = packing.PackedIterator(arrays, 8, seed=7, pad_id=TOK.pad_id)
    starts, lengths = packing.example_spans(arrays["mask"])
    stream = [r for e in range(4) for r in it.epoch_rows(e)]
    per_epoch = len(it.epoch_rows(0))
    self.assertNotEqual(per_epoch % 8, 0)  # the case where a batch straddles epochs
    batches = [next(it) for _ in range(3 * per_epoch // 8)]
    for k, b in enumerate(batches):
      want = packing.build_rows(arrays, starts, lengths, stream[8 * k:8 * k + 8], TOK.pad_id)
      for key in packing.PACKED_KEYS:
        np.testing.assert_array_equal(b[key], want[key], f"batch {k} {key}")
      self.assertTrue(np.all(b["mask"] == (b["segment_ids"] > 0)))
    for position in (1, per_epoch // 8, len(batches) - 2):  # mid-epoch, at the boundary
      resumed = packing.PackedIterator(arrays, 8, seed=7, pad_id=TOK.pad_id)
      resumed.position = position
      for k in range(position, min(position + 2, len(batches))):
        np.testing.assert_array_equal(next(resumed)["tokens"], batches[k]["tokens"])
    halves = [packing.PackedIterator(arrays, 8, 7, i, 2, pad_id=TOK.pad_id) for i in (0, 1)]
    for k in range(3):
      got = [next(h) for h in halves]
      for key in packing.PACKED_KEYS:
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), batches[k][key])
    st = it.stats(0)
    self.assertEqual(st["rows"], per_epoch)
    self.assertLess(st["padding_fraction"], st["padding_fraction_unpacked"])

  def test_config_check_and_stage(self):
    """A capacity-routed MoE with packing is refused naming the key; the SFT stage trains
    on packed rows and logs how full they are."""
    cfg = config_lib.get_config("sft", "test")
    cfg.data.packing = True
    cfg.model.moe.update(num_experts=4, top_k=2)
    with self.assertRaisesRegex(ValueError, r"^data.packing=True .* model.moe.dropless"):
      validate.check(cfg)
    cfg.model.moe.dropless = True
    validate.check(cfg)
    cfg = testing.pipeline_config("sft")
    # Sort examples are 19-31 bytes: rows of 24 + 40 hold two of them.
    cfg.data.update(packing=True, max_completion_len=40)
    cfg.sft.train.update(num_steps=1, eval_every=0)
    metrics = pipeline.run(cfg, None).metrics
    self.assertTrue(np.isfinite(metrics["loss"]))
    self.assertGreater(metrics["examples_per_row"], 1.5)
    self.assertBetween(metrics["padding_fraction"], 0.0, 0.3)


if __name__ == "__main__":
  absltest.main()
