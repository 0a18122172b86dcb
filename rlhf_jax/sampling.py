"""Jitted generation with a KV cache: temperature, top-k, top-p, EOS, min/max new tokens.

One call = prefill the left-padded prompts, then `max_new_tokens` decode steps in a
`lax.scan`, so the whole rollout is one compiled program with static shapes. After a row
emits EOS it is finished: later positions hold `pad_id` with mask 0 (the EOS itself is kept
and has mask 1). The returned log-probs are those of the full softmax of logits/temperature,
before top-k/top-p filtering, which is what PPO needs for its old log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.models import transformer
from rlhf_jax.models.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 1.0  # 0 = greedy.
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  min_new_tokens: int = 0  # EOS is forbidden before this many tokens.
  # Samples per prompt: the prompts are prefilled once and their KV cache repeated, so the
  # output has B * num_samples rows, a prompt's samples consecutive.
  num_samples: int = 1

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"samples per prompt must be >= 1, got {self.num_samples}.")
    if self.max_new_tokens <= 0:
      raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}.")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self}.")


def from_config(section, max_new_tokens: int) -> SamplingConfig:
  """The run's `sampling` config section as a SamplingConfig (every stage samples alike)."""
  return SamplingConfig(max_new_tokens=max_new_tokens, temperature=section.temperature,
                        top_k=section.top_k, top_p=section.top_p,
                        min_new_tokens=section.min_new_tokens)


def decode_rows(tok, tokens_BxN, mask_BxN) -> list[str]:
  """The texts of sampled rows (host arrays): the tokens under the mask, decoded."""
  return [tok.decode(t[m.astype(bool)]) for t, m in zip(np.asarray(tokens_BxN),
                                                         np.asarray(mask_BxN))]


@dataclasses.dataclass
class Samples:
  """One sampled response per prompt of a list, as ids in PPO's rollout layout: the
  left-padded prompt, then the response tokens and mask from the sampler (pads after EOS).
  Score `seq` / `seq_mask` (what `ppo.Iteration.rollout` builds and the RM scores there), not
  the decoded `texts` re-encoded: decode -> encode need not give back the sampled ids."""
  prompt_tokens: np.ndarray  # [N, P] left-padded prompts
  prompt_mask: np.ndarray  # [N, P]
  tokens: np.ndarray  # [N, M] response tokens
  mask: np.ndarray  # [N, M] 1 up to and including EOS
  tokenizer: Any

  @property
  def seq(self) -> np.ndarray:
    """Prompt + response tokens, [N, P + M]."""
    return np.concatenate([self.prompt_tokens, self.tokens], axis=1)

  @property
  def seq_mask(self) -> np.ndarray:
    return np.concatenate([self.prompt_mask, self.mask], axis=1)

  @functools.cached_property
  def texts(self) -> list[str]:
    """The decoded responses (decoded on first use)."""
    return decode_rows(self.tokenizer, self.tokens, self.mask)


def sample_prompts(sampler, params, tok, prompts: Sequence[str], mesh, max_prompt_len: int,
                   batch_size: int, rng: jax.Array) -> Samples:
  """One sample per prompt, in order, `batch_size` prompts per call of `sampler` (a
  `make_sampler` function: build it once, so repeated calls reuse its program). The batch at
  row offset i draws with `fold_in(rng, i)`."""
  arrays = batching.prompt_arrays(list(prompts), tok, max_prompt_len)

  def sample(start, b):
    out = sampler(params, b["tokens"], b["mask"], jax.random.fold_in(rng, start))
    return {"tokens": out["tokens"], "mask": out["mask"]}

  outs = sharding.for_each_batch(sample, arrays, batch_size, mesh)

  def rows(key):
    if not outs:
      return np.zeros((0, 0), np.int32)
    return np.concatenate([o[key] for o in outs])[:len(prompts)]

  return Samples(arrays["tokens"], arrays["mask"], rows("tokens"), rows("mask"), tok)


def sample_texts(sampler, params, tok, prompts: Sequence[str], mesh, max_prompt_len: int,
                 batch_size: int, rng: jax.Array) -> list[str]:
  """The decoded responses of `sample_prompts` (same arguments, same draws)."""
  return sample_prompts(sampler, params, tok, prompts, mesh, max_prompt_len, batch_size,
                        rng).texts


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / nucleus to -inf (the most likely token always stays)."""
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token if the mass strictly before it is < top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), -1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
  return logits_BxV


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """`jnp.argmax(x_BxV, -1)` (the first index of the maximum) as two plain reductions.

  XLA:CPU lowers argmax to a (value, index) pair reduction that is several times slower than
  a max followed by a min over the indices attaining it; this is every decode step's cost.
  A row without a finite maximum (NaN logits) gives V - 1, an id that is at least in range.
  """
  v = x_BxV.shape[-1]
  iota_V = jnp.arange(v, dtype=jnp.int32)
  is_max_BxV = x_BxV == x_BxV.max(axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max_BxV, iota_V, v - 1), axis=-1)


def categorical(key: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits_BxV), by inverse CDF: the first token whose
  cumulative probability reaches u ~ U(0, 1] (scaled by the row's total, so rounding in the
  float32 sum cannot run past the end).

  One uniform per row instead of Gumbel-max's V (`jax.random.categorical`): in a 64-step
  decode loop over [16, 8192] logits on CPU, Gumbel noise + argmax took 3x as long as this.
  Tokens of probability 0 (filtered to -inf) are never drawn: their CDF step is empty.
  """
  b, v = logits_BxV.shape
  cdf_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1)
  u_Bx1 = (1.0 - jax.random.uniform(key, (b, 1), jnp.float32)) * cdf_BxV[:, -1:]
  return jnp.minimum((cdf_BxV < u_Bx1).sum(axis=-1, dtype=jnp.int32), v - 1)


def make_sampler(graphdef, sampling: SamplingConfig, eos_id: int, pad_id: int):
  """Returns jitted `sample(params, prompt_BxP, prompt_mask_BxP, rng) -> dict`.

  Output: `tokens` [B, N], `mask` [B, N] (1 up to and including EOS), `logprobs` [B, N]
  (0 where mask is 0).
  """
  s = sampling

  def sample(params, prompt_BxP, prompt_mask_BxP, rng):
    # Scanned layers (model.scan_layers) decode unscanned: see transformer.unscanned.
    model = transformer.unscanned(nnx.merge(graphdef, params))
    model.eval()  # MoE layers: eval capacity factor, no router jitter (no-op when dense)
    b, p = prompt_BxP.shape
    cache = init_cache(model.cfg, b, p + s.max_new_tokens)
    h_BxPxD, cache = model.trunk(prompt_BxP, prompt_mask_BxP, cache)
    # Only the last prompt position predicts a token (prompts are left-padded): the LM head
    # on all P positions would be P times its FLOPs and a [B, P, V] buffer for nothing.
    first_logits_BxV = model.logits(h_BxPxD[:, -1:])[:, 0]
    if s.num_samples > 1:  # G samples per prompt: the prefill's cache, repeated row-wise
      first_logits_BxV = jnp.repeat(first_logits_BxV, s.num_samples, axis=0)
      cache = cache.repeat_rows(s.num_samples)
      b = b * s.num_samples

    def step(carry, t):
      logits_BxV, cache, done_B, rng = carry
      rng, key = jax.random.split(rng)
      logits_BxV = logits_BxV.astype(jnp.float32)
      if s.temperature > 0:
        logits_BxV = logits_BxV / s.temperature
      # Log-probs of the policy itself, before the EOS ban below: PPO's training forward
      # recomputes exactly these.
      logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
      if s.min_new_tokens:
        banned_V = jnp.arange(logits_BxV.shape[-1]) == eos_id
        logits_BxV = jnp.where((t < s.min_new_tokens) & banned_V, -jnp.inf, logits_BxV)
      if s.temperature > 0:
        token_B = categorical(key, filter_logits(logits_BxV, s.top_k, s.top_p))
      else:
        token_B = first_argmax(logits_BxV)
      live_B = ~done_B
      token_B = jnp.where(live_B, token_B, pad_id).astype(jnp.int32)
      logp_B = jnp.where(live_B, jnp.take_along_axis(logp_BxV, token_B[:, None], -1)[:, 0], 0.0)
      next_logits, cache = model(token_B[:, None], live_B[:, None].astype(jnp.int32), cache)
      done_B = done_B | (token_B == eos_id)
      return (next_logits[:, -1], cache, done_B, rng), (token_B, live_B, logp_B)

    init = (first_logits_BxV, cache, jnp.zeros((b,), bool), rng)
    _, (tokens_NxB, mask_NxB, logp_NxB) = jax.lax.scan(step, init, jnp.arange(s.max_new_tokens))
    return {"tokens": tokens_NxB.T, "mask": mask_NxB.T.astype(jnp.int32), "logprobs": logp_NxB.T}

  return jax.jit(sample, compiler_options=decode_compiler_options())


def decode_compiler_options() -> dict | None:
  """XLA options for a compiled decode loop on this backend.

  On CPU, XLA's XNNPACK ("ynn") fusions are slower than its Eigen dots for a decode step's
  small [B, D] x [D, F] products: without them the benchmark's generation is ~25% faster
  (benchmarks/README.md), while training steps (large products) are not, so only the
  sampler turns them off. Other backends: no options.
  """
  if jax.default_backend() == "cpu":
    return {"xla_cpu_experimental_ynn_fusion_type": ""}
  return None
