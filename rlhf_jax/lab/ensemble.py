"""K reward models held as one: a stacked parameter tree (every leaf [K, ...]) and a
vmapped forward, so scoring with the whole ensemble is one program, not K.

The members must share an architecture (e.g. RMs trained on different label draws or
seeds from the same SFT trunk). Each keeps its own normalisation (gain_K, bias_K), so
`scores` returns what each member's `RewardFunction.score` would; `score` combines them with
the ensemble's conservative objective of `rl/ensembles.py` (Coste et al. 2024), so a
`RewardEnsemble` is a reward any RL stage takes in place of one RM. The stacked tree keeps
each member's layout and splits the ensemble axis over the mesh axes of the `ensemble`
sharding rule (`expert`): with mesh.expert = K each device holds one member.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import artifacts, sharding
from rlhf_jax.rl import ensembles


@dataclasses.dataclass
class RewardEnsemble:
  graphdef: Any
  params: Any  # every leaf stacked: [K, ...]
  gain_K: jax.Array
  bias_K: jax.Array
  model_config: Any
  tokenizer: Any
  critic_source: artifacts.RewardFunction  # member 0: what PPO's `critic="reward"` starts from
  objective: str = "mean"  # how `score` combines the members (rl/ensembles.py)
  lam: float = 0.5  # uncertainty_weighted's weight on the members' std

  @classmethod
  def stack(cls, members: Sequence[artifacts.RewardFunction], objective: str = "mean",
            lam: float = 0.5) -> "RewardEnsemble":
    if not members:
      raise ValueError("a reward ensemble needs at least one member.")
    ensembles.ENSEMBLE_OBJECTIVES.check(objective)
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
      if m.model_config != first.model_config:
        raise ValueError(f"reward ensemble: member {i}'s network differs from member 0's "
                         "(stacking needs one architecture).")
    leaves = [jax.tree.leaves(m.params) for m in members]
    treedef = jax.tree.structure(first.params)
    stacked = []
    for xs in zip(*leaves):
      out = sharding.stacked_sharding(xs[0].sharding, len(members))
      stacked.append(jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*xs))
    return cls(first.graphdef, jax.tree.unflatten(treedef, stacked),
               jnp.asarray([m.gain for m in members], jnp.float32),
               jnp.asarray([m.bias for m in members], jnp.float32),
               first.model_config, first.tokenizer, first, objective, lam)

  def with_objective(self, objective: str, lam: float | None = None) -> "RewardEnsemble":
    ensembles.ENSEMBLE_OBJECTIVES.check(objective)
    return dataclasses.replace(self, objective=objective, lam=self.lam if lam is None else lam)

  @property
  def size(self) -> int:
    return int(self.gain_K.shape[0])

  def scores(self, params, tokens_BxT, mask_BxT):
    """[K, B]: every member's normalised score, one vmapped forward."""
    raw_KxB = jax.vmap(lambda p: artifacts.eval_model(self.graphdef, p)(tokens_BxT, mask_BxT)
                       )(params)
    return self.gain_K[:, None] * raw_KxB + self.bias_K[:, None]

  def score(self, params, tokens_BxT, mask_BxT):
    """[B]: the members' scores combined by the ensemble's objective."""
    return ensembles.combine(self.scores(params, tokens_BxT, mask_BxT), self.objective,
                             self.lam)
