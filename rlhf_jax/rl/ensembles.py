"""Conservative objectives over an ensemble of K reward models (Coste et al. 2024),
registered by name: `(scores_KxB, lam) -> [B]`.

    mean                  the members' mean
    worst_case            the minimum over members (WCO)
    uncertainty_weighted  mean - lam * std over members (UWO; population std)

`disagreement` (the members' std, averaged) is the early-warning signal the lab logs as
`reward/ensemble_std`. Checked against numpy in tests/lab_test.py.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.registry import Registry

ENSEMBLE_OBJECTIVES = Registry("ensemble.objective")


@ENSEMBLE_OBJECTIVES.register("mean")
def mean_objective(scores_KxB, lam: float = 0.0):
  del lam
  return scores_KxB.mean(axis=0)


@ENSEMBLE_OBJECTIVES.register("worst_case")
def worst_case_objective(scores_KxB, lam: float = 0.0):
  del lam
  return scores_KxB.min(axis=0)


@ENSEMBLE_OBJECTIVES.register("uncertainty_weighted")
def uncertainty_weighted_objective(scores_KxB, lam: float = 0.5):
  return scores_KxB.mean(axis=0) - lam * scores_KxB.std(axis=0)


def disagreement(scores_KxB):
  """The mean over the batch of the members' std: how much the ensemble disagrees."""
  return scores_KxB.std(axis=0).mean()


def combine(scores_KxB, objective: str, lam: float = 0.5):
  """The registered `objective` of the members' scores, [B]."""
  return ENSEMBLE_OBJECTIVES.get(objective)(jnp.asarray(scores_KxB), lam)
