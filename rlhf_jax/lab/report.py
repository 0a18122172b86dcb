"""The lab's outputs from its points: `fits.json`, the plots and `report.md`.

Every best-of-N curve is fitted with Gao et al.'s R_bon(d) = d (alpha - beta d)
(`lab/fits.py`); the report gives each fit's coefficients and R^2 next to what the data
itself shows (the measured peak, and whether gold fell while the proxy still rose), and
says so when a fit is poor or a mitigation does not help.
"""

from __future__ import annotations

import os

import numpy as np

from rlhf_jax.fileio import atomic_write, write_json
from rlhf_jax.lab import bon_curves, fits, warning

POOR_FIT_R2 = 0.8


def by_curve(points: list[dict]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for p in points:
    out.setdefault(p["curve"], []).append(p)
  return out


def fit_curves(points: list[dict]) -> dict[str, dict]:
  """curve -> its fit (alpha, beta, R^2, fitted peak), the measured peak and, for RL curves
  watched by an ensemble, the early-warning verdict (`lab/warning.py`)."""
  out = {}
  for curve, pts in by_curve(points).items():
    f = fits.fit(pts[0]["method"], [p["kl"] for p in pts], [p["gold"] for p in pts])
    out[curve] = {**f.to_json(), "max_kl": max(p["kl"] for p in pts),
                  "measured": bon_curves.peak(pts)}
    if pts[0]["method"] == "rl" and "ensemble_std" in pts[0]:
      out[curve]["warning"] = warning.verdict(pts)
  return out


def plot(points: list[dict], curves: list[str], path: str, title: str,
         fitted: dict[str, dict]) -> None:
  """Gold and proxy against d = sqrt(KL) for `curves`, each gold curve's fit drawn through its
  points. Best-of-N points are joined (d grows with N); RL points are not (an RL run's KL
  goes back and forth between evaluations)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 4))
  groups, colors = by_curve(points), {}
  for curve in curves:
    pts = groups[curve]
    d = [p["d"] for p in pts]
    joined = "-" if pts[0]["method"] == "bon" else ""
    # One colour per reward: its best-of-N and RL curves match.
    color = colors.setdefault(curve.removeprefix("rl/"), f"C{len(colors)}")
    line, = ax_gold.plot(d, [p["gold"] for p in pts], "o" + joined, color=color, label=curve)
    f = fitted[curve]
    grid = np.linspace(0.0, max(d), 100)
    fit = fits.Fit(f["form"], f["alpha"], f["beta"], f["r2"], f["num_points"], None, None)
    ax_gold.plot(grid, fit.predict(grid ** 2), ":", color=line.get_color(), lw=1.2)
    ax_proxy.plot(d, [p["proxy"] for p in pts], "s" + ("--" if joined else ""),
                  color=line.get_color(), label=curve)
  ax_gold.axhline(0.0, color="grey", ls=":", lw=0.8)
  ax_gold.set(xlabel="d = sqrt(KL to SFT)", ylabel="gold reward − SFT's",
              title="gold (dotted: the fitted R(d))")
  ax_proxy.set(xlabel="d = sqrt(KL to SFT)", ylabel="proxy (normalised RM) score",
               title="proxy")
  ax_gold.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fit_row(curve: str, f: dict) -> str:
  m = f["measured"]
  if f["peak_kl"] is None:
    peak = "none (β ≤ 0)"
  elif f["peak_kl"] > 4 * f["max_kl"]:  # an extrapolation, not a finding
    peak = f"beyond the data (KL {f['peak_kl']:.3g} > 4 × the largest measured)"
  else:
    peak = f"{f['peak_gold']:+.3f} at KL {f['peak_kl']:.2f}"
  poor = " (poor fit)" if not f["r2"] >= POOR_FIT_R2 else ""
  return (f"| {curve} | {f['alpha']:.4f} | {f['beta']:.4f} | {f['r2']:.3f}{poor} | {peak} | "
          f"{m['peak_gold']:+.3f} at {m['peak_at']} | {m['last_gold']:+.3f} | "
          f"{'yes' if m['overoptimised'] else 'no'} |")


def findings(fitted: dict[str, dict], proxies: list[str], members: list[str]) -> list[str]:
  """Plain statements of what the measured curves show."""
  lines = []
  for c in proxies + [c for c in fitted if c.startswith("rl/")]:
    m = fitted[c]["measured"]
    if m["overoptimised"]:
      verdict = ("over-optimisation: gold falls by more than 2 standard errors "
                 f"({m['noise_2se']:.3f}) while the proxy still rises.")
    elif m["fall"] > 0:
      verdict = (f"gold falls by {m['fall']:.3f}, within 2 standard errors "
                 f"({m['noise_2se']:.3f}): not distinguishable from sampling noise.")
    else:
      verdict = "no fall of gold within this KL range."
    lines.append(f"- {c}: gold peaks at {m['peak_at']} ({m['peak_gold']:+.3f}) and ends at "
                 f"{m['last_gold']:+.3f}; {verdict}")
  if members:
    single = np.mean([fitted[c]["measured"]["last_gold"] for c in members])
    for c in (c for c in fitted if c.startswith("ensemble/")):
      last = fitted[c]["measured"]["last_gold"]
      verdict = "helps" if last > single else "does not help"  # vs the members it combines
      lines.append(f"- {c}: gold at the largest N {last:+.3f} vs {single:+.3f} for a single "
                   f"member on average: the ensemble {verdict} here.")
  rl_single = [c for c in fitted if c.startswith("rl/pairs_")]
  for c in (c for c in fitted if c.startswith("rl/ensemble/")):
    m = fitted[c]["measured"]
    for other in rl_single:  # vs each single RM, at the end and at its best
      o = fitted[other]["measured"]
      verdict = "helps" if m["last_gold"] > o["last_gold"] + o["noise_2se"] / 2 else (
          "does not help" if m["last_gold"] < o["last_gold"] - o["noise_2se"] / 2 else
          "makes no difference beyond noise")
      lines.append(f"- {c} vs {other}: gold at the end {m['last_gold']:+.3f} vs "
                   f"{o['last_gold']:+.3f} (peaks {m['peak_gold']:+.3f} vs "
                   f"{o['peak_gold']:+.3f}): the ensemble objective {verdict}.")
  return lines


def _groups(fitted: dict[str, dict]) -> dict[str, list[str]]:
  return {"bon_ens": [c for c in fitted if c.startswith("ensemble/")],
          "rl": [c for c in fitted if c.startswith("rl/pairs_")],
          "rl_ens": [c for c in fitted if c.startswith("rl/ensemble/")],
          "watched": [c for c in fitted if fitted[c].get("warning")]}


def _plots(out_dir: str, points: list[dict], fitted: dict, proxies: list[str],
           members: list[str]) -> list[str]:
  """Draws the figures; their markdown lines."""
  g, lines = _groups(fitted), []
  figures = [("bon_proxies.png", proxies, "Best-of-N against proxy RMs of several strengths"),
             ("rl_proxies.png", g["rl"],
              "PPO against proxy RMs of several strengths (held-out evaluations)"),
             ("bon_ensembles.png", members[:1] + g["bon_ens"] if g["bon_ens"] else [],
              "Best-of-N against ensemble objectives (and one member)"),
             ("rl_ensembles.png", g["rl"][-1:] + g["rl_ens"] if g["rl_ens"] else [],
              "PPO against ensemble objectives (and the strongest single proxy)"),
             ("bon_vs_rl.png", proxies + g["rl"] if g["rl"] else [],
              "Best-of-N (joined) vs PPO (dots) against the same proxies")]
  for name, curves, title in figures:
    if curves:
      plot(points, curves, os.path.join(out_dir, name), title, fitted)
      lines += ["", f"![{name[:-4]}]({name})"]
  if g["watched"]:
    warning.plot(by_curve(points), g["watched"], os.path.join(out_dir, "rl_warning.png"))
  return lines


def write(out_dir: str, points: list[dict], rms: dict[str, dict], costs: dict[str, float],
          proxies: list[str], members: list[str], command: str) -> dict[str, dict]:
  """Writes fits.json, the plots and report.md into `out_dir`; returns the fits."""
  fitted = fit_curves(points)
  write_json(os.path.join(out_dir, "fits.json"), fitted)
  figures = _plots(out_dir, points, fitted, proxies, members)
  lines = ["# Reward over-optimisation lab", "", f"`{command}`", "",
           "## Proxy reward models", "", "| RM | training pairs | held-out accuracy | "
           "gold agreement |", "|---|---|---|---|"]
  for name, r in rms.items():
    lines.append(f"| {name} | {r['pairs']} | {r['eval_accuracy']:.3f} | "
                 f"{r.get('eval_gold_agreement', float('nan')):.3f} |")
  lines += ["", "## Fits: best-of-N R(d) = d (α − β d), RL (`rl/…`) R(d) = d (α − β log d); "
            "d = sqrt(KL)", "",
            "| curve | α | β | R² | fitted peak | measured peak | gold at the end | "
            "over-optimised |", "|---|---|---|---|---|---|---|---|"]
  lines += [_fit_row(c, f) for c, f in fitted.items()]
  lines += ["", "## What the data shows", ""] + findings(fitted, proxies, members) + figures
  watched = _groups(fitted)["watched"]
  if watched:
    lines += ["", "## Early warning: the ensemble during PPO, without gold", "",
              "The ensemble's members score every held-out evaluation's samples (each member "
              "normalised on SFT samples). Disagreement is their std, averaged over samples; "
              "its onset is the first evaluation more than 2 standard errors above the SFT "
              "policy's. The ensemble mean's onset is the first evaluation more than 2 "
              "standard errors below the best one before it (what a run without gold can "
              "watch); gold's fall, the first after gold's best that far below it. A signal "
              "warned when its onset came no later than gold's fall; an onset when gold never "
              "fell is a false alarm.", ""]
    lines += [warning.sentence(c, fitted[c]["warning"])
              + (" (The ensemble watching is the one optimised here: not an independent "
                 "judge.)" if c.startswith("rl/ensemble/") else "") for c in watched]
    lines += ["", "![warning](rl_warning.png)"]
  lines += ["", "## Cost", "", "| part | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in costs.items()]
  atomic_write(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
  return fitted
