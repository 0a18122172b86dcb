"""Where a stage's text records come from: a bundled task, JSONL files, or a TFDS dataset.

`data.train_path` / `data.eval_path` name JSONL files; `data.tfds_name` (+ `tfds_data_dir`)
names an array_record TFDS dataset prepared with `rlhf_jax.data.tfds_builder` or by the
user. Otherwise the bundled `data.task` supplies records, and its gold reward is used to
score samples. The tokenizer is built (or reused from the workdir) here too, since it may
be trained on the same text.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import ml_collections

from rlhf_jax.data import sources, tasks, tokenizer as tokenizer_lib


@dataclasses.dataclass
class StageData:
  train: list[dict[str, str]]
  eval: list[dict[str, str]]
  sources: dict[str, str]  # split -> where it came from (named in errors)
  tokenizer: tokenizer_lib.Tokenizer
  gold_reward: Callable[[str, str], float] | None  # bundled tasks only


def _tfds_records(d, split: str, schema: str) -> list[dict[str, str]]:
  from rlhf_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_split(d.tfds_name, split, d.tfds_data_dir or None)
  return [sources.check_record(r, schema, f"tfds:{d.tfds_name}/{split}: record {i}")
          for i, r in enumerate(src, start=1)]


def load_records(config: ml_collections.ConfigDict, section: str, schema: str, task_fn: str):
  """(train, eval, source names, task or None) for one schema ('sft', 'preference', ...),
  from `config.<section>.data` (files) or the shared `data.task`."""
  d = config[section].data
  if d.train_path:
    train = sources.read_jsonl(d.train_path, schema)
    evals = sources.read_jsonl(d.eval_path, schema)
    return train, evals, {"train": d.train_path, "eval": d.eval_path}, None
  if d.tfds_name:
    names = {s: f"tfds:{d.tfds_name}/{s}" for s in ("train", d.tfds_eval_split)}
    return (_tfds_records(d, "train", schema), _tfds_records(d, d.tfds_eval_split, schema),
            {"train": names["train"], "eval": names[d.tfds_eval_split]}, None)
  name = config.data.task
  task = tasks.get_task(name)
  get = getattr(task, task_fn)
  return (get(d.num_train, config.seed, "train"), get(d.num_eval, config.seed, "eval"),
          {"train": f"task:{name}/train", "eval": f"task:{name}/eval"}, task)


def uses_files(section_data) -> bool:
  """Whether a stage's `data` section names files or a TFDS dataset (not the bundled task)."""
  return bool(section_data.get("train_path") or section_data.get("tfds_name")
              or section_data.get("prompts_path"))


@dataclasses.dataclass
class Prompts:
  train: list[str]
  eval: list[str]
  task: Any  # the bundled task (gold reward), or None for prompt files
  # split -> where it came from (named in errors, e.g. too few prompts for one batch)
  sources: dict[str, str] = dataclasses.field(default_factory=dict)


def load_prompts(config: ml_collections.ConfigDict, section: str = "ppo") -> Prompts:
  """Train and held-out prompts of `config.<section>.data`: prompt JSONL files, or the
  shared bundled task's prompts."""
  d = config[section].data
  if d.prompts_path:
    train = [r["prompt"] for r in sources.read_jsonl(d.prompts_path, "prompt")]
    evals = [r["prompt"] for r in sources.read_jsonl(d.eval_prompts_path, "prompt")]
    return Prompts(train[:d.num_train_prompts], evals[:d.num_eval_prompts], None,
                   {"train": d.prompts_path, "eval": d.eval_prompts_path})
  task = tasks.get_task(config.data.task)
  return Prompts([r["prompt"] for r in task.prompts(d.num_train_prompts, config.seed, "train")],
                 [r["prompt"] for r in task.prompts(d.num_eval_prompts, config.seed, "eval")],
                 task, {"train": f"task:{config.data.task}/train prompts",
                        "eval": f"task:{config.data.task}/eval prompts"})


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str | None, corpus):
  t = config.tokenizer
  return tokenizer_lib.get_tokenizer(t.kind, workdir, corpus, t.vocab_size, t.model_path,
                                    chat=t.get("chat", False))


def load_sft_data(config: ml_collections.ConfigDict, workdir: str | None) -> StageData:
  train, evals, names, task = load_records(config, "sft", "sft", "sft_records")
  if task is not None:
    corpus = task.corpus
  else:
    corpus = lambda: itertools.chain.from_iterable((r["prompt"], r["completion"]) for r in train)
  tok = build_tokenizer(config, workdir, corpus)
  return StageData(train, evals, names, tok, task.gold_reward if task else None)
