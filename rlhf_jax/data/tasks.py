"""Bundled offline tasks: SFT data, prompts and a gold reward over decoded text.

The gold reward stands in for the human labeller of real RLHF; it is exact, so reward-model
accuracy and PPO progress can be measured against the truth.
"""

from __future__ import annotations

import random
import re
from typing import Callable


class SortTask:
  """"sort 7 2 9 =" -> " 2 7 9": sort a few single digits ascending.

  Gold reward in [-1, 1]: the fraction of positions that match the sorted list, minus a
  penalty for a wrong length, so partial progress is visible to the reward model.
  """

  name = "sort"

  def __init__(self, min_len: int = 3, max_len: int = 6):
    if not 1 <= min_len <= max_len:
      raise ValueError(f"sort task: need 1 <= min_len <= max_len, got {min_len}, {max_len}.")
    self.min_len, self.max_len = min_len, max_len

  def _digits(self, rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]

  def prompts(self, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": "sort " + " ".join(map(str, self._digits(rng))) + " ="} for _ in range(n)]

  def sft_records(self, n: int, seed: int) -> list[dict[str, str]]:
    out = []
    for p in self.prompts(n, seed):
      digits = sorted(int(d) for d in re.findall(r"\d", p["prompt"]))
      out.append({"prompt": p["prompt"], "completion": " " + " ".join(map(str, digits))})
    return out

  def gold_reward(self, prompt: str, completion: str) -> float:
    want = sorted(int(d) for d in re.findall(r"\d", prompt))
    got = [int(t) for t in completion.split() if t.isdigit()]
    hits = sum(a == b for a, b in zip(got, want))
    return hits / len(want) - abs(len(got) - len(want)) / len(want)


TASKS: dict[str, Callable[[], SortTask]] = {"sort": SortTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"data.task is {name!r}; bundled tasks are {sorted(TASKS)}.")
  return TASKS[name]()
