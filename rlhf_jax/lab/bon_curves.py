"""Best-of-N curves: the gold and proxy reward of the response a ranking keeps, for every N.

One sampling run gives every curve: max(N) responses per held-out prompt from the SFT policy
(`stages/best_of_n.sample_groups`), scored once by the gold reward, by every proxy RM and by
the ensemble objectives. For a ranking (a proxy's score, or an ensemble objective) and N,
the kept response is the best of each prompt's first N. A point holds

    kl = log N - (N - 1) / N,  d = sqrt(kl),
    gold  = mean gold reward of the kept responses - that of N = 1 (the SFT policy's), and
    proxy = mean ranking score of the kept responses,

so every curve starts at (0, 0) in gold, as the fits of `lab/fits.py` assume.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf_jax.rl import core
from rlhf_jax.stages import best_of_n


def points(curve: str, ranking_PxG: np.ndarray, gold_PxG: np.ndarray, ns) -> list[dict]:
  """The points of one best-of-N curve (see the module docstring)."""
  rows = np.arange(len(ranking_PxG))
  base = float(np.mean(gold_PxG[:, 0], dtype=np.float64))
  out = []
  for n in ns:
    best_P = best_of_n.best_indices(ranking_PxG, n)
    kl = core.best_of_n_kl(n)
    kept = np.asarray(gold_PxG[rows, best_P], np.float64)
    out.append({"curve": curve, "method": "bon", "n": int(n), "kl": kl, "d": math.sqrt(kl),
                "gold": float(kept.mean()) - base,
                "gold_se": float(kept.std(ddof=1) / math.sqrt(len(kept))) if len(kept) > 1
                           else float("nan"),
                "proxy": float(np.mean(ranking_PxG[rows, best_P], dtype=np.float64))})
  return out


def peak(curve_points: list[dict]) -> dict:
  """Where the measured gold peaks, and whether it then falls while the proxy still rises
  (over-optimisation seen in the data, not in a fit): by more than twice the standard
  error of the difference, so that sampling noise over a few dozen prompts does not count.
  Also used for the RL curves (`lab/rl_curves.py`), whose points carry an iteration."""
  gold = [p["gold"] for p in curve_points]
  i = int(np.argmax(gold))
  top, last = curve_points[i], curve_points[-1]
  noise = 2.0 * math.sqrt(top.get("gold_se", 0.0) ** 2 + last.get("gold_se", 0.0) ** 2)
  at = f"N = {top['n']}" if "n" in top else f"iteration {top['iteration']}"
  return {"peak_at": at, "peak_kl": top["kl"], "peak_gold": gold[i],
          "last_gold": last["gold"], "fall": gold[i] - last["gold"], "noise_2se": noise,
          "overoptimised": bool(i < len(gold) - 1 and gold[i] - last["gold"] > noise
                                and last["proxy"] > top["proxy"])}
