"""Orbax checkpoints with exact resume.

A checkpoint holds the whole `TrainState` (params, optimizer state, step) plus a small JSON
`meta` (data-iterator position, stage-specific numbers). Randomness is never saved: every
stage derives its keys as `fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly
what an uninterrupted one would. Orbax writes into a temporary directory and renames it
when complete, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory: str, save_every: int, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def maybe_save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self._mngr.all_steps():
      return False
    # Params are their own item so that later stages can restore them alone.
    self._mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        meta=ocp.args.JsonSave(meta)))
    self._mngr.wait_until_finished()
    logging.info("saved checkpoint %s/%d", self.directory, step)
    return True

  def restore(self, like, step: int | None = None):
    """(state, meta) at `step` (default: latest), placed with the shardings of `like`."""
    step = self._step(step)
    abstract = _abstract(like)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state}),
        meta=ocp.args.JsonRestore()))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    state = like.replace(step=out.train["step"], params=out.params,
                         opt_state=out.train["opt_state"])
    return state, dict(out.meta)

  def restore_params(self, like_params, step: int | None = None):
    """Only the parameters (e.g. an SFT policy to start the RM or PPO from)."""
    step = self._step(step)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(like_params))))
    logging.info("restored params from %s/%d", self.directory, step)
    return out.params

  def _step(self, step):
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    return step

  def close(self):
    self._mngr.close()


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of arrays or of abstract arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
