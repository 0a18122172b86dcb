"""Early-warning signals: does an RM ensemble see over-optimisation before gold falls?

A real run has no gold reward, but it can afford K reward models besides the one it
optimises. Their scores of the policy's samples (each member normalised on SFT samples, so
the units match) give two signals, logged as `reward/ensemble_{std,mean}` every iteration
and `eval/ensemble_{std,mean}` at each held-out evaluation:

* disagreement (`rl/ensembles.disagreement`, the members' std averaged over samples): does
  it rise, as the policy leaves the data the members were trained on?
* the ensemble's mean score: a held-out judge of the optimised proxy; does it fall while
  the proxy rises?

On an RL curve of the lab (points of `lab/rl_curves.py`), each signal's onset is the first
evaluation where it moved beyond twice the standard error of the difference (disagreement
above the SFT policy's; the mean below its best so far), so sampling noise over the
held-out prompts does not count. Gold's fall is the first evaluation after its best that is
that far below it. A signal warned when its onset came at or before gold's fall; an onset
when gold never fell is a false alarm.
"""

from __future__ import annotations

import math

SIGNALS = {"std": "disagreement", "mean": "ensemble mean score"}


def _se(p: dict, key: str) -> float:
  se = p.get(f"{key}_se", 0.0)
  return se if math.isfinite(se) else 0.0  # e.g. a point of a single sample


def _beyond(a: dict, b: dict, key: str) -> float:
  """How far b[key] is above a[key], in units of twice the SE of the difference."""
  se = math.sqrt(_se(a, key) ** 2 + _se(b, key) ** 2)
  return (b[key] - a[key]) / (2.0 * se) if se > 0 else math.copysign(math.inf, b[key] - a[key])


def first_rise(points: list[dict], key: str) -> dict | None:
  """The first point whose `key` exceeds the first point's by more than 2 SE."""
  return next((p for p in points[1:] if _beyond(points[0], p, key) > 1.0), None)


def first_fall(points: list[dict], key: str) -> dict | None:
  """The first point whose `key` is below the best point before it by more than 2 SE."""
  best = points[0]
  for p in points[1:]:
    if _beyond(p, best, key) > 1.0:
      return p
    if p[key] > best[key]:
      best = p
  return None


def gold_fall(points: list[dict]) -> dict | None:
  """The first point after gold's best that is below it by more than 2 SE (in hindsight:
  a dip that gold later climbs out of is not its fall)."""
  i = max(range(len(points)), key=lambda k: points[k]["gold"])
  return next((p for p in points[i + 1:] if _beyond(p, points[i], "gold") > 1.0), None)


def verdict(points: list[dict]) -> dict | None:
  """Gold's fall and each signal's onset (iterations, None: never) and whether the signal
  warned (None when gold never fell); None for points without the ensemble's scores."""
  if not points or "ensemble_std" not in points[0]:
    return None
  fall = gold_fall(points)
  onsets = {"std": first_rise(points, "ensemble_std"),
            "mean": first_fall(points, "ensemble_mean")}
  out = {"gold_fall_iteration": None if fall is None else fall["iteration"],
         "gold_peak_iteration": max(points, key=lambda p: p["gold"])["iteration"]}
  for name, onset in onsets.items():
    out[f"{name}_onset_iteration"] = None if onset is None else onset["iteration"]
    out[f"{name}_sft"] = points[0][f"ensemble_{name}"]
    out[f"{name}_last"] = points[-1][f"ensemble_{name}"]
    out[f"warned_by_{name}"] = (None if fall is None else
                                onset is not None and onset["iteration"] <= fall["iteration"])
  return out


def sentence(curve: str, v: dict) -> str:
  """One line of the report for the verdict `v` of `curve`."""
  if v["gold_fall_iteration"] is None:
    head = (f"- {curve}: gold never fell beyond noise (best at iteration "
            f"{v['gold_peak_iteration']}): nothing to warn of.")
  else:
    head = (f"- {curve}: gold fell beyond noise at iteration {v['gold_fall_iteration']} "
            f"(best at {v['gold_peak_iteration']}).")
  parts = []
  for name, label in SIGNALS.items():
    moved = "rose" if name == "std" else "fell"
    onset = v[f"{name}_onset_iteration"]
    when = (f"never {moved} beyond noise" if onset is None else
            f"{moved} beyond noise at iteration {onset}")
    warned = v[f"warned_by_{name}"]
    if warned is None:
      tail = "" if onset is None else ": a false alarm"
    elif warned:
      lead = v["gold_fall_iteration"] - onset
      tail = (f": a warning {lead} iterations ahead" if lead else
              ": a warning, at the same evaluation")
    else:
      tail = ": no warning"
    parts.append(f"{label} {v[f'{name}_sft']:+.3f} → {v[f'{name}_last']:+.3f}, {when}{tail}")
  return head + " " + "; ".join(parts)[0].upper() + "; ".join(parts)[1:] + "."


def plot(points_by_curve: dict[str, list[dict]], curves: list[str], path: str) -> None:
  """Per RL curve against the iteration: gold, proxy and the ensemble's mean score (relative
  to the SFT policy's) and the ensemble's disagreement; gold's fall marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = min(3, len(curves))
  rows = -(-len(curves) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
  for ax in axes.flat[len(curves):]:
    ax.set_visible(False)
  for ax, curve in zip(axes.flat, curves):
    pts = points_by_curve[curve]
    it = [p["iteration"] for p in pts]
    ax.plot(it, [p["gold"] for p in pts], "o-", color="C0", label="gold")
    for key, style, color, label in (("proxy", "s--", "C1", "proxy"),
                                     ("ensemble_mean", "d:", "C2", "ensemble mean")):
      ax.plot(it, [p[key] - pts[0][key] for p in pts], style, color=color, label=label)
    ax.set(xlabel="PPO iteration", ylabel="change from the SFT policy", title=curve)
    twin = ax.twinx()
    twin.errorbar(it, [p["ensemble_std"] for p in pts],
                  yerr=[2 * p["ensemble_std_se"] for p in pts], color="C3", marker="^",
                  label="disagreement (±2 SE)")
    twin.set_ylabel("ensemble disagreement (std)", color="C3")
    fall = verdict(pts)["gold_fall_iteration"]
    if fall is not None:
      ax.axvline(fall, color="C0", ls=":")
    handles, labels = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles + more[0], labels + more[1], fontsize=7, loc="upper left")
  fig.suptitle("Early warning without gold: the ensemble during PPO (gold's fall dotted)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
