"""Proxy reward models of several strengths, and ensemble members, from one set of pairs.

Every proxy is the RM stage (`stages/rm.py`, the config's `rm` section: steps, batch,
normalisation) run on a subset of the same labelled pairs:

* `lab.proxy_pairs` (e.g. 250 / 1000 / 4000): the first n pairs of one shuffled order, so
  the sets are nested and strength differs only by label count;
* `lab.ensemble_size` members, each on its own draw of `lab.ensemble_pairs` pairs with its
  own seed (initialisation, batch order), for the conservative ensembles.

Each trains in `<workdir>/lab/<name>/rm` (resumed when interrupted, reused when finished)
and reports its held-out accuracy and gold agreement on the same held-out pairs.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from rlhf_jax import artifacts
from rlhf_jax.stages import preferences, rm


def subsets(num_pairs: int, lab, seed: int) -> dict[str, np.ndarray]:
  """name -> indices into the train pairs: proxies `pairs_<n>`, members `member_<k>`."""
  need = max(max(lab.proxy_pairs), lab.ensemble_pairs if lab.ensemble_size else 0)
  if need > num_pairs:
    raise ValueError(f"lab: {need} training pairs asked (lab.proxy_pairs / "
                     f"lab.ensemble_pairs) but the preference data holds {num_pairs}; raise "
                     "rm.data.num_train_prompts (about 2 prompts per kept pair) or lower them.")
  order = np.random.default_rng([seed, 0]).permutation(num_pairs)
  out = {f"pairs_{n}": order[:n] for n in lab.proxy_pairs}
  for k in range(lab.ensemble_size):
    draw = np.random.default_rng([seed, k + 1]).permutation(num_pairs)
    out[f"member_{k}"] = draw[:lab.ensemble_pairs]
  return out


def train(config, name: str, index: np.ndarray, policy, prefs, task, mesh, workdir: str,
          seed: int):
  """(normalised RM, its metrics) of the RM stage on `prefs.train[index]`, seed `seed`."""
  out_dir = os.path.join(workdir, "lab", name)
  if artifacts.finished(os.path.join(out_dir, "rm"), config.rm.train.num_steps):
    path = os.path.join(out_dir, "rm")
    logging.info("[lab] reusing the finished proxy RM %s", path)
    return artifacts.load_reward_model(path, mesh), artifacts.read_summary(path)
  cfg = config.copy_and_resolve_references()
  cfg.seed = seed
  subset = preferences.PreferenceData(
      [prefs.train[i] for i in index], prefs.eval,
      {"train": f"{prefs.sources['train']} ({len(index)} of them, {name})",
       "eval": prefs.sources["eval"]})
  result = rm.run(cfg, policy, subset, task, mesh, out_dir)
  return result.reward, result.metrics
