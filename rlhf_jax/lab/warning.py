"""The early-warning signal: does the RM ensemble's disagreement rise before gold falls?

A real run has no gold reward, but it can afford K reward models. Their disagreement on the
policy's samples (`rl/ensembles.disagreement`, the members' std averaged over samples; each
member normalised on SFT samples, so the units match) is logged as `reward/ensemble_std`
every iteration and as `eval/ensemble_std` at each held-out evaluation. On an RL curve of
the lab (points of `lab/rl_curves.py`):

* onset: the first evaluation whose disagreement exceeds the SFT policy's by more than twice
  the standard error of the difference (so sampling noise over the held-out prompts does
  not count);
* the gold peak and whether gold then falls beyond noise (`bon_curves.peak`);
* the verdict: the warning came before the fall (onset at or before the peak), after it, or
  there was no fall to warn of.
"""

from __future__ import annotations

import math

from rlhf_jax.lab import bon_curves


def onset(curve_points: list[dict]) -> dict | None:
  """The first point whose `ensemble_std` rose beyond 2 SE above the first point's, or None
  (also when the points carry no disagreement)."""
  if not curve_points or "ensemble_std" not in curve_points[0]:
    return None
  base = curve_points[0]
  for p in curve_points[1:]:
    noise = 2.0 * math.sqrt(base["ensemble_std_se"] ** 2 + p["ensemble_std_se"] ** 2)
    if p["ensemble_std"] - base["ensemble_std"] > noise:
      return p
  return None


def verdict(curve_points: list[dict]) -> dict | None:
  """Onset, gold peak and whether the warning preceded the fall; None without the signal."""
  if "ensemble_std" not in curve_points[0]:
    return None
  first = onset(curve_points)
  peak = bon_curves.peak(curve_points)
  top = max(curve_points, key=lambda p: p["gold"])
  out = {"onset_iteration": None if first is None else first["iteration"],
         "onset_kl": None if first is None else first["kl"],
         "peak_iteration": top["iteration"], "overoptimised": peak["overoptimised"],
         "sft_std": curve_points[0]["ensemble_std"],
         "last_std": curve_points[-1]["ensemble_std"]}
  if not peak["overoptimised"]:
    out["warned_before_fall"] = None  # nothing to warn of
  else:
    out["warned_before_fall"] = first is not None and first["iteration"] <= top["iteration"]
  return out


def sentence(curve: str, v: dict) -> str:
  """One line of the report for the verdict `v` of `curve`."""
  rise = ("did not rise beyond noise" if v["onset_iteration"] is None else
          f"rose beyond noise at iteration {v['onset_iteration']} (KL {v['onset_kl']:.1f})")
  head = (f"- {curve}: disagreement {v['sft_std']:.3f} at SFT → {v['last_std']:.3f} at the "
          f"end; it {rise}; gold peaked at iteration {v['peak_iteration']}")
  if v["warned_before_fall"] is None:
    return head + ", and did not fall beyond noise: no fall to warn of."
  if v["warned_before_fall"]:
    lead = v["peak_iteration"] - v["onset_iteration"]
    return head + f" and then fell: the warning came {lead} iterations before the fall began."
  return head + " and then fell: the disagreement did not warn before the fall."


def plot(points_by_curve: dict[str, list[dict]], curves: list[str], path: str) -> None:
  """Per RL curve: gold and proxy (relative to SFT) and the ensemble's disagreement against
  the iteration, the disagreement's onset marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
  for ax, curve in zip(axes[0], curves):
    pts = points_by_curve[curve]
    it = [p["iteration"] for p in pts]
    ax.plot(it, [p["gold"] for p in pts], "o-", color="C0", label="gold − SFT's")
    ax.plot(it, [p["proxy"] - pts[0]["proxy"] for p in pts], "s--", color="C1",
            label="proxy − SFT's")
    ax.set(xlabel="PPO iteration", title=curve)
    twin = ax.twinx()
    twin.errorbar(it, [p["ensemble_std"] for p in pts],
                  yerr=[2 * p["ensemble_std_se"] for p in pts], color="C3", marker="^",
                  label="ensemble std (±2 SE)")
    twin.set_ylabel("ensemble disagreement", color="C3")
    first = onset(pts)
    if first is not None:
      ax.axvline(first["iteration"], color="C3", ls=":")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
  fig.suptitle("Early warning: ensemble disagreement vs gold during PPO (onset dotted)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
