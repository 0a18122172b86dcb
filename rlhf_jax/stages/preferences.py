"""Preference data for the bundled tasks, labelled by a simulated annotator.

For each prompt the SFT policy samples `samples_per_prompt` completions; consecutive
samples form pairs, and a Bradley-Terry annotator prefers a over b with probability

    P(a > b) = sigmoid((gold(a) - gold(b)) / temperature)

(temperature -> 0 is a noise-free labeller), as AlpacaFarm and Gao et al. simulate human
labellers with a gold reward. Pairs are written as preference JSONL in
`<workdir>/rm/preferences_{train,eval}.jsonl` so they can be inspected, with the settings that
made them; a rerun reuses them, and a rerun with other settings is an error naming what
changed (nothing is overwritten). Reads `config.rm.data` and the shared sections.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from rlhf_jax import artifacts, sampling
from rlhf_jax.data import sources
from rlhf_jax.fileio import write_json


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


@dataclasses.dataclass
class PreferenceData:
  train: list[dict]
  eval: list[dict]
  sources: dict[str, str]  # split -> file the pairs are in (named in errors)


def run(config, task, policy: artifacts.Policy, mesh, workdir: str) -> PreferenceData:
  """Generated (or reused) labelled pairs for both splits."""
  if not workdir:
    raise ValueError("generating preferences needs a workdir to write them into.")
  d = config.rm.data
  sampler = sampling.make_sampler(
      policy.graphdef, sampling.from_config(config.sampling, config.data.max_completion_len),
      policy.tokenizer.eos_id, policy.tokenizer.pad_id)
  out_dir = artifacts.stage_dir(workdir, "rm")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, n in (("train", d.num_train_prompts), ("eval", d.num_eval_prompts)):
    path = os.path.join(out_dir, f"preferences_{split}.jsonl")
    # Generation is deterministic, so a rerun reuses the file, but only if it was made with
    # the same settings: stale pairs from other settings would silently train the wrong RM.
    settings = generation_settings(config, split, n)
    settings_path = path[:-len(".jsonl")] + ".settings.json"
    if os.path.exists(path) and os.path.exists(settings_path):
      _check_same_settings(path, settings_path, settings)
    if not os.path.exists(path):
      generate(config, task, policy, sampler, mesh, split, n, path)
      write_json(settings_path, settings)
    paths[split] = path
  return PreferenceData(sources.read_jsonl(paths["train"], "preference"),
                        sources.read_jsonl(paths["eval"], "preference"), paths)


def _check_same_settings(path: str, settings_path: str, settings: dict[str, Any]) -> None:
  with open(settings_path) as f:
    old = json.load(f)
  changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
  if changed:
    diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
    raise ValueError(f"{path} was generated with other settings ({diff}); use a fresh "
                     f"--workdir, or delete {path} and {settings_path} to regenerate.")


def generation_settings(config, split: str, num_prompts: int) -> dict[str, Any]:
  """Everything that determines a generated preference file (the SFT policy aside)."""
  d = config.rm.data
  keys = ("samples_per_prompt", "generation_batch_size", "annotator_temperature",
          "annotator_seed", "drop_ties")
  return {"split": split, "num_prompts": num_prompts, "seed": config.seed,
          "task": config.data.task, "max_prompt_len": config.data.max_prompt_len,
          "max_completion_len": config.data.max_completion_len,
          **{k: d[k] for k in keys},
          **{f"sampling.{k}": v for k, v in config.sampling.to_dict().items()}}


def generate(config, task, policy, sampler, mesh, split: str, num_prompts: int, path: str):
  """Writes `num_prompts * samples_per_prompt / 2` labelled pairs (before drops) to `path`."""
  d = config.rm.data
  k = d.samples_per_prompt
  prompts = [p["prompt"] for p in task.prompts(num_prompts, config.seed, split)]
  repeated = [p for p in prompts for _ in range(k)]
  seed = config.seed + (0 if split == "train" else 1)
  texts = sampling.sample_texts(sampler, policy.params, policy.tokenizer, repeated, mesh,
                                config.data.max_prompt_len, d.generation_batch_size,
                                jax.random.PRNGKey(seed))
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
                     "Train SFT longer or raise rm.data.num_train_prompts / num_eval_prompts.")
  sources.write_jsonl(path, records, "preference")
  logging.info("[preferences] %s: %s -> %s (gold reward of samples: mean %.3f)", split,
               counts, path, gold.mean())
  return counts
