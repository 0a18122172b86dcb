"""RL curves: PPO against each proxy RM (or ensemble objective), the held-out gold and proxy
reward every few iterations against the sampled KL to the SFT policy.

Each run is the PPO stage (`stages/ppo.py`, the config's `ppo` section) from the SFT policy
with the proxy as its reward, `lab.rl.num_iterations` long, evaluating every
`lab.rl.eval_every` iterations (`ppo.train.eval_every`: `eval/kl`, `eval/gold_reward` and its
standard error, `eval/rm_score` on the held-out prompts, one key throughout, and with an
ensemble watching, `eval/ensemble_{std,mean}`: the early-warning signals of
`lab/warning.py`). It runs in `<workdir>/lab/rl_<proxy>` (`/` in the name becomes `_`;
resumed, reused when finished). The first point is the SFT policy's (d = 0, from the summary
on the same prompts and key), and gold is relative to it, as the fit
R_rl(d) = d (alpha - beta log d) assumes.
"""

from __future__ import annotations

import math
import os

from rlhf_jax import artifacts
from rlhf_jax.data import records as records_lib
from rlhf_jax.stages import ppo
from rlhf_jax.train import metrics as metrics_lib


def run(config, name: str, policy, reward, rm_metrics, mesh, workdir: str,
        monitor=None) -> list[dict]:
  """The points of PPO against proxy `name` (trained now, or read back when finished);
  `monitor`: the RM ensemble whose disagreement and mean score are logged."""
  lab = config.lab
  cfg = config.copy_and_resolve_references()
  cfg.ppo.num_iterations = lab.rl.num_iterations
  cfg.ppo.train.eval_every = lab.rl.eval_every
  out_dir = os.path.join(workdir, "lab", "rl_" + name.replace("/", "_"))
  if not artifacts.finished(os.path.join(out_dir, "ppo"), lab.rl.num_iterations):
    ppo.run(cfg, policy, reward, records_lib.load_prompts(cfg, "ppo"), mesh, out_dir,
            rm_metrics, monitor)
  rows = metrics_lib.read_rows(out_dir, "ppo")
  return points(f"rl/{name}", [r for r in rows if "eval/kl" in r],
                artifacts.read_summary(os.path.join(out_dir, "ppo")))


def points(curve: str, eval_rows: list[dict], summary: dict) -> list[dict]:
  """The SFT point, then one per held-out evaluation (gold relative to SFT's)."""
  base = summary["final/sft_gold_reward"]
  sft = {"curve": curve, "method": "rl", "iteration": 0, "kl": 0.0, "d": 0.0, "gold": 0.0,
         "gold_se": summary.get("final/sft_gold_reward_se", float("nan")),
         "proxy": summary.get("final/sft_rm_score", float("nan"))}
  for key in ("ensemble_std", "ensemble_std_se", "ensemble_mean", "ensemble_mean_se"):
    if f"final/sft_{key}" in summary:
      sft[key] = summary[f"final/sft_{key}"]
  out = [sft]
  for r in eval_rows:
    kl = max(r["eval/kl"], 0.0)
    p = {"curve": curve, "method": "rl", "iteration": r["step"], "kl": kl,
         "d": math.sqrt(kl), "gold": r["eval/gold_reward"] - base,
         "gold_se": r.get("eval/gold_reward_se", float("nan")),
         "proxy": r.get("eval/rm_score", float("nan"))}
    p.update({k: r[f"eval/{k}"] for k in ("ensemble_std", "ensemble_std_se", "ensemble_mean",
                                          "ensemble_mean_se") if f"eval/{k}" in r})
    out.append(p)
  return out
