"""K reward models held as one: a stacked parameter tree (every leaf [K, ...]) and a
vmapped forward, so scoring with the whole ensemble is one program, not K.

The members must share an architecture (e.g. RMs trained on different label draws or
seeds from the same SFT trunk). Each keeps its own normalisation (gain_K, bias_K), so
`scores` returns what each member's `RewardFunction.score` would; `score` combines them with
a conservative objective of `rl/ensembles.py` (Coste et al. 2024). The stacked tree is placed
as the members were, with the ensemble axis replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import artifacts
from rlhf_jax.rl import ensembles


@dataclasses.dataclass
class RewardEnsemble:
  graphdef: Any
  params: Any  # every leaf stacked: [K, ...]
  gain_K: jax.Array
  bias_K: jax.Array
  model_config: Any
  tokenizer: Any

  @classmethod
  def stack(cls, members: Sequence[artifacts.RewardFunction]) -> "RewardEnsemble":
    if not members:
      raise ValueError("a reward ensemble needs at least one member.")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
      if m.model_config != first.model_config:
        raise ValueError(f"reward ensemble: member {i}'s network differs from member 0's "
                         "(stacking needs one architecture).")
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[m.params for m in members])
    return cls(first.graphdef, params,
               jnp.asarray([m.gain for m in members], jnp.float32),
               jnp.asarray([m.bias for m in members], jnp.float32),
               first.model_config, first.tokenizer)

  @property
  def size(self) -> int:
    return int(self.gain_K.shape[0])

  def scores(self, params, tokens_BxT, mask_BxT):
    """[K, B]: every member's normalised score, one vmapped forward."""
    raw_KxB = jax.vmap(lambda p: artifacts.eval_model(self.graphdef, p)(tokens_BxT, mask_BxT)
                       )(params)
    return self.gain_K[:, None] * raw_KxB + self.bias_K[:, None]

  def score(self, params, tokens_BxT, mask_BxT, objective: str = "mean", lam: float = 0.5):
    """[B]: the members' scores combined by `objective` (mean, worst_case,
    uncertainty_weighted with weight `lam`)."""
    return ensembles.combine(self.scores(params, tokens_BxT, mask_BxT), objective, lam)
