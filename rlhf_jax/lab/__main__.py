"""The gold-reward lab: `python -m rlhf_jax.lab --config=configs/lab.py [--workdir=DIR]`.

With a bundled task's gold reward standing in for human judgement, one run measures how the
proxy reward and the gold reward part as best-of-N selects harder (Gao, Schulman & Hilton
2022), for proxy RMs of several strengths and for conservative RM ensembles (Coste et al.
2024):

  1. SFT and labelled preference pairs (the pipeline; reused from the workdir), the default
     RM with them;
  2. proxy RMs on nested subsets of the pairs and ensemble members on independent draws
     (`lab/proxies.py`);
  3. one best-of-N sampling run on held-out prompts, scored by gold, every proxy and the
     ensemble (one vmapped forward, `lab/ensemble.py`); every curve (`lab/bon_curves.py`);
  4. PPO against each proxy and each ensemble objective, with held-out evaluations along the
     way (`lab/rl_curves.py`), the ensemble's disagreement and mean score logged as
     early-warning signals (`lab/warning.py`);
  5. `<workdir>/lab/points.jsonl`, `fits.json`, `bon_*.png`, `rl_*.png` and `report.md`
     (`lab/report.py`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import tqdm
from absl import app, logging

from rlhf_jax import main as main_lib  # its --config (here the lab's) and --workdir
from rlhf_jax import artifacts, pipeline, sharding, validate
from rlhf_jax.fileio import atomic_write
from rlhf_jax.lab import bon_curves, ensemble, proxies, report, rl_curves
from rlhf_jax.rl import ensembles
from rlhf_jax.stages import best_of_n


def check(config) -> None:
  """The lab section's constraints, one line naming the key."""
  lab = config.lab
  validate.increasing_ints("lab.proxy_pairs", lab.proxy_pairs)
  if lab.ensemble_size == 1 or lab.ensemble_size < 0:
    raise ValueError(f"lab.ensemble_size is {lab.ensemble_size}: use 0 (no ensemble) or >= 2.")
  experts = config.mesh.expert  # the ensemble axis is split over it (sharding rule "ensemble")
  if lab.ensemble_size and experts > 1 and lab.ensemble_size % experts:
    raise ValueError(f"lab.ensemble_size is {lab.ensemble_size}, which mesh.expert={experts} "
                     "does not divide: the members are split over that axis; change either.")
  for name in lab.objectives:
    ensembles.ENSEMBLE_OBJECTIVES.check(name)
  if validate.increasing_ints("lab.bon.n", lab.bon.n)[0] != 1:
    raise ValueError(f"lab.bon.n must start at 1 (the SFT baseline), got {tuple(lab.bon.n)!r}.")
  for key in ("num_prompts", "batch_size"):
    if not lab.bon[key] > 0:
      raise ValueError(f"lab.bon.{key} must be positive, got {lab.bon[key]}.")
  for key in ("num_iterations", "eval_every"):
    if lab.rl[key] < 0:
      raise ValueError(f"lab.rl.{key} must be >= 0, got {lab.rl[key]}.")
  for name in lab.rl.objectives:
    ensembles.ENSEMBLE_OBJECTIVES.check(name)
  if lab.rl.num_iterations and lab.rl.objectives and not lab.ensemble_size:
    raise ValueError("lab.rl.objectives needs an ensemble: set lab.ensemble_size >= 2 or "
                     "lab.rl.objectives=().")
  if lab.rl.num_iterations and not lab.rl.eval_every:
    raise ValueError("lab.rl.eval_every must be positive: the RL curves are its evaluations.")
  if lab.rl.num_iterations and config.ppo.reward != "model":
    raise ValueError("the lab's RL runs optimise the proxy RMs: set ppo.reward='model'.")
  if config.rm.data.train_path or config.rm.data.tfds_name:
    raise ValueError("the lab needs a bundled task's gold reward to label and score: unset "
                     "rm.data.train_path / tfds_name.")


def _train_rms(config, policy, prefs, task, mesh, workdir, bar, costs):
  rms, rewards = {}, {}
  for name, index in proxies.subsets(len(prefs.train), config.lab, config.seed).items():
    t0 = time.perf_counter()
    seed = config.seed if name.startswith("pairs_") else config.seed + 1 + int(name[7:])
    rewards[name], metrics = proxies.train(config, name, index, policy, prefs, task, mesh,
                                           workdir, seed)
    rms[name] = {"pairs": len(index), **{k: metrics[k] for k in
                                         ("eval_accuracy", "eval_gold_agreement")
                                         if k in metrics}}
    costs[f"RM {name}"] = time.perf_counter() - t0
    bar.update(1)
  return rms, rewards


def _curves(config, policy, task, rewards, ens, mesh, bar, costs) -> list[dict]:
  lab = config.lab
  t0 = time.perf_counter()
  prompts = [r["prompt"] for r in task.prompts(lab.bon.num_prompts, config.seed, "eval")]
  g = max(lab.bon.n)
  samples = best_of_n.sample_groups(config, policy, prompts, mesh, g, lab.bon.batch_size)
  gold = best_of_n.score_groups(samples, prompts, None, task, mesh, 0)["gold_reward"]
  costs["best-of-N sampling + gold"] = time.perf_counter() - t0
  bar.update(1)
  t0, rows, points = time.perf_counter(), lab.bon.batch_size * g, []
  for name, reward in rewards.items():
    if name.startswith("pairs_"):
      proxy = artifacts.sequence_scores(jax.jit(reward.score), reward.params, samples.seq,
                                        samples.seq_mask, rows, mesh)
      points += bon_curves.points(name, proxy.reshape(len(prompts), g), gold, lab.bon.n)
  if ens is not None:
    scores_KxN = artifacts.sequence_scores(jax.jit(ens.scores), ens.params, samples.seq,
                                           samples.seq_mask, rows, mesh)
    for k, s in enumerate(scores_KxN):
      points += bon_curves.points(f"member_{k}", s.reshape(len(prompts), g), gold, lab.bon.n)
    for objective in lab.objectives:
      combined = np.asarray(ensembles.combine(scores_KxN, objective, lab.uncertainty_lambda))
      points += bon_curves.points(f"ensemble/{objective}", combined.reshape(len(prompts), g),
                                  gold, lab.bon.n)
  costs["scoring + curves"] = time.perf_counter() - t0
  bar.update(1)
  return points


def run(config, workdir: str, command: str = "python -m rlhf_jax.lab") -> dict:
  """The whole lab in `workdir`; returns the fits."""
  validate.check(config)
  check(config)
  mesh = sharding.make_mesh(config.mesh)
  lab = config.lab
  num_rms = len(lab.proxy_pairs) + lab.ensemble_size
  num_rl = (len(lab.proxy_pairs) + len(lab.rl.objectives) * bool(lab.ensemble_size)
            if lab.rl.num_iterations else 0)
  bar = tqdm.tqdm(total=num_rms + num_rl + 4, desc="lab", unit="part", file=sys.stderr)
  costs = {}
  t0 = time.perf_counter()
  upto_rm = config.copy_and_resolve_references()
  upto_rm.stage = "rm"  # SFT, pairs, the default RM (reused when finished); not its PPO
  out = pipeline.run(upto_rm, workdir)
  prefs, task = pipeline.preference_data(config, workdir, mesh, out.policy)
  costs["SFT, pairs, default RM"] = time.perf_counter() - t0
  bar.update(1)
  rms, rewards = _train_rms(config, out.policy, prefs, task, mesh, workdir, bar, costs)
  members = [r for n, r in rewards.items() if n.startswith("member_")]
  ens = (ensemble.RewardEnsemble.stack(members, lam=lab.uncertainty_lambda) if members
         else None)
  points = _curves(config, out.policy, task, rewards, ens, mesh, bar, costs)
  runs = [(n, rewards[n], rms[n]) for n in rewards if n.startswith("pairs_")]
  runs += [(f"ensemble/{o}", ens.with_objective(o), None) for o in lab.rl.objectives if ens]
  for name, reward, rm_metrics in (runs if num_rl else []):
    t0 = time.perf_counter()
    points += rl_curves.run(config, name, out.policy, reward, rm_metrics, mesh, workdir, ens)
    costs[f"PPO against {name}"] = time.perf_counter() - t0
    bar.update(1)
  out_dir = os.path.join(workdir, "lab")
  os.makedirs(out_dir, exist_ok=True)
  atomic_write(os.path.join(out_dir, "points.jsonl"),
               "".join(json.dumps(p) + "\n" for p in points))
  fitted = report.write(out_dir, points, rms, costs,
                        [n for n in rewards if n.startswith("pairs_")],
                        [n for n in rewards if n.startswith("member_")], command)
  bar.update(1)
  bar.close()
  logging.info("[lab] report: %s", os.path.join(out_dir, "report.md"))
  return fitted


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = main_lib._CONFIG.value  # pylint: disable=protected-access
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/lab.py")
  workdir = main_lib._WORKDIR.value  # pylint: disable=protected-access
  os.makedirs(workdir, exist_ok=True)
  main_lib._use_compilation_cache("", workdir)  # pylint: disable=protected-access
  try:
    run(config, workdir, "python -m rlhf_jax.lab " + " ".join(sys.argv[1:]))
  except main_lib.EXPECTED_ERRORS as e:
    sys.stderr.write(f"error: {type(e).__name__}: {' '.join(str(e).split())}\n")
    sys.exit(1)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
