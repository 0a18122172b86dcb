"""Preference data for the bundled tasks, labelled by a simulated annotator.

For each prompt the SFT policy samples `samples_per_prompt` completions; consecutive
samples form pairs, and a Bradley-Terry annotator prefers a over b with probability

    P(a > b) = sigmoid((gold(a) - gold(b)) / temperature)

(temperature -> 0 is a noise-free labeller), as AlpacaFarm and Gao et al. simulate human
labellers with a gold reward. Pairs are written as preference JSONL in the workdir so
they can be inspected and are reused on a rerun.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from rlhf_jax import sharding
from rlhf_jax.data import batching, sources
from rlhf_jax.sampling import SamplingConfig, make_sampler


def annotate(gold_a: np.ndarray, gold_b: np.ndarray, temperature: float,
             rng: np.random.Generator) -> np.ndarray:
  """True where the simulated annotator prefers a over b."""
  if temperature < 0:
    raise ValueError(f"annotator temperature must be >= 0, got {temperature}.")
  diff = np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)
  if temperature == 0:
    return np.where(diff == 0, rng.random(diff.shape) < 0.5, diff > 0)
  p_a = 1.0 / (1.0 + np.exp(-diff / temperature))
  return rng.random(diff.shape) < p_a


@dataclasses.dataclass
class GenerationCounts:
  pairs: int = 0
  identical: int = 0  # both samples decode to the same text
  empty: int = 0  # a sample that is EOS straight away
  ties: int = 0  # equal gold reward (dropped with drop_ties: the label would be a coin flip)


def sample_completions(policy, prompts: list[str], mesh, max_prompt_len: int,
                       max_new_tokens: int, sampling_cfg, batch_size: int, seed: int) -> list[str]:
  """Decoded samples of the policy, one per prompt, in order (one compiled sampler)."""
  tok = policy.tokenizer
  sampler = make_sampler(policy.graphdef, SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=sampling_cfg.temperature,
      top_k=sampling_cfg.top_k, top_p=sampling_cfg.top_p), eos_id=tok.eos_id, pad_id=tok.pad_id)
  n = len(prompts)
  padded = prompts + [prompts[-1]] * (-n % batch_size)  # fixed shape: pad the last batch
  arrays = batching.prompt_arrays(padded, tok, max_prompt_len)
  texts = []
  with sharding.use_mesh(mesh):
    for i in range(0, len(padded), batch_size):
      b = sharding.shard_global_batch({k: v[i:i + batch_size] for k, v in arrays.items()}, mesh)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      out = sharding.to_host(sampler(policy.params, b["tokens"], b["mask"], rng))
      texts += [tok.decode(t[m.astype(bool)]) for t, m in zip(out["tokens"], out["mask"])]
  return texts[:n]


def generate(task, policy, mesh, config, split: str, num_prompts: int, path: str):
  """Writes `num_prompts * samples_per_prompt / 2` labelled pairs (before drops) to `path`."""
  d = config.data
  k = d.samples_per_prompt
  if k < 2 or k % 2:
    raise ValueError(f"data.samples_per_prompt must be even and >= 2, got {k}.")
  prompts = [p["prompt"] for p in task.prompts(num_prompts, config.seed, split)]
  repeated = [p for p in prompts for _ in range(k)]
  seed = config.seed + (0 if split == "train" else 1)
  texts = sample_completions(policy, repeated, mesh, d.max_prompt_len, d.max_completion_len,
                             config.sampling, d.generation_batch_size, seed)
  gold = np.asarray([task.gold_reward(p, t) for p, t in zip(repeated, texts)])
  a, b = np.arange(0, len(texts), 2), np.arange(1, len(texts), 2)
  prefer_a = annotate(gold[a], gold[b], d.annotator_temperature,
                      np.random.default_rng([d.annotator_seed, seed]))
  counts, records = GenerationCounts(), []
  for i, j, a_wins in zip(a, b, prefer_a):
    if not texts[i] or not texts[j]:
      counts.empty += 1
    elif texts[i] == texts[j]:
      counts.identical += 1
    elif d.drop_ties and gold[i] == gold[j]:
      counts.ties += 1
    else:
      c, r = (i, j) if a_wins else (j, i)
      records.append({"prompt": repeated[i], "chosen": texts[c], "rejected": texts[r],
                      "gold_chosen": float(gold[c]), "gold_rejected": float(gold[r])})
  counts.pairs = len(records)
  if not records:
    raise ValueError(f"no usable {split} preference pairs from {num_prompts} prompts ({counts}): "
                     "the SFT policy's samples are all empty, identical or tied in gold reward. "
                     "Train SFT longer or raise data.num_train_prompts / num_eval_prompts.")
  sources.write_jsonl(path, records, "preference")
  logging.info("[rm] %s preferences: %s -> %s (gold reward of samples: mean %.3f)", split,
               counts, path, gold.mean())
  return counts
