"""Orbax checkpoints with exact resume.

A checkpoint holds the `TrainState` (its trained params, optimizer state, step; a LoRA
state's frozen base is not saved, see `train/state.py`) plus a small JSON `meta` (data-iterator position, stage-specific numbers). Randomness is never saved: every
stage derives its keys as `fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly
what an uninterrupted one would. Orbax writes into a temporary directory and renames it
when complete, so an interrupted save never leaves a half-written checkpoint behind.

A step folder can still be damaged afterwards (a truncated copy, a full disk while syncing
it elsewhere, flipped bytes, an emptied folder). Restoring the latest checkpoint then falls
back, with a warning naming the folder and the error, to the previous steps, newest first;
when none restores it is one error naming the directory. A damaged step found that way is
moved aside (`<step>.damaged`) before the run saves that step again (orbax saves no step at
or below its latest).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from rlhf_jax.fileio import NO_SPACE, no_space


ITEMS = ("params", "train", "meta")  # the items of a step folder written by `maybe_save`


class Checkpointer:

  def __init__(self, directory: str, save_every: int, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.restored_step: int | None = None  # the step the last restore actually read
    self._damaged: dict[int, str] = {}  # step -> why it could not be restored
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                             create=True))

  def latest_step(self) -> int | None:
    """The newest step folder, intact or not (see `latest_good_step`)."""
    return self._mngr.latest_step()

  def latest_good_step(self, items=ITEMS) -> int | None:
    """The newest step whose folder holds every one of `items` as a non-empty folder and
    that no restore here found damaged: a cheap check that reads no array (a truncated or
    corrupt data file is found only by restoring it)."""
    for step in sorted(self._mngr.all_steps(), reverse=True):
      if step not in self._damaged and self._looks_complete(step, items):
        return step
    return None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _looks_complete(self, step: int, items) -> bool:
    for item in items:
      path = os.path.join(self._step_dir(step), item)
      if not os.path.isdir(path) or not os.listdir(path):
        return False
    return True

  def maybe_save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    self._drop_damaged(step)
    if step in self._mngr.all_steps():
      return False
    # Params are their own item so that later stages can restore them alone.
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(_trained(state).params),
          train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
          meta=ocp.args.JsonSave(meta)))
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore wrap OSErrors
      if _is_no_space(e):
        raise no_space(self._step_dir(step), fix="free space there or use another "
                       "--workdir") from e
      raise
    logging.info("saved checkpoint %s/%d", self.directory, step)
    return True

  def restore(self, like, step: int | None = None):
    """(state, meta) at `step` (default: the latest that restores), placed with the
    shardings of `like`, whose frozen params it keeps; `state.step` and `meta["step"]` are
    the step actually restored."""
    abstract = _abstract(_trained(like))
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state}),
        meta=ocp.args.JsonRestore())
    step, out = self._restore(step, args, ITEMS)
    logging.info("restored checkpoint %s/%d", self.directory, step)
    joined = like.with_trained(out.params) if hasattr(like, "with_trained") else like.replace(
        params=out.params)
    state = joined.replace(step=out.train["step"], opt_state=out.train["opt_state"])
    return state, dict(out.meta)

  def restore_params(self, like_params, step: int | None = None):
    """Only the parameters (e.g. an SFT policy to start the RM or PPO from), of `step`
    (default: the latest that restores)."""
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like_params)))
    step, out = self._restore(step, args, ("params",))
    logging.info("restored params from %s/%d", self.directory, step)
    return out.params

  def _restore(self, step: int | None, args, items) -> tuple[int, Any]:
    """(step, restored items): `step`, or the steps newest first until one restores."""
    if step is not None:
      if step not in self._mngr.all_steps():
        raise FileNotFoundError(f"{self._step_dir(step)}: no checkpoint of step {step} "
                                f"(steps there: {self._mngr.all_steps() or 'none'}); pick "
                                "one of those steps or use a fresh --workdir.")
      try:
        out = self._try_restore(step, args, items)
      except Exception as e:  # pylint: disable=broad-except
        self._damaged[step] = _reason(e)
        raise ValueError(f"{self._step_dir(step)}: checkpoint of step {step} could not be "
                         f"restored ({self._damaged[step]}); delete that step folder or use a "
                         "fresh --workdir.") from e
      self.restored_step = step
      return step, out
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint there; give the folder of a "
                              "run that saved checkpoints or use a fresh --workdir.")
    failures = []
    for s in steps:
      try:
        out = self._try_restore(s, args, items)
      except Exception as e:  # pylint: disable=broad-except
        self._damaged[s] = _reason(e)
        failures.append(f"step {s}: {self._damaged[s]}")
        logging.warning("checkpoint %s could not be restored (%s); trying the previous one.",
                        self._step_dir(s), self._damaged[s])
        continue
      if failures:
        logging.warning("restored %s instead of the damaged newer checkpoint(s) of %s.",
                        self._step_dir(s), self.directory)
      self.restored_step = s
      return s, out
    raise ValueError(f"{self.directory}: no checkpoint could be restored "
                     f"({'; '.join(failures)}); delete the damaged step folders or use a fresh "
                     "--workdir.")

  def _try_restore(self, step: int, args, items):
    missing = [i for i in items if not self._looks_complete(step, (i,))]
    if missing:  # orbax's own error for this is a KeyError listing items
      raise FileNotFoundError(f"the step folder has no {', '.join(missing)} (empty or "
                              "incomplete)")
    return self._mngr.restore(step, args=args)

  def _drop_damaged(self, step: int):
    """Moves the step folders at or after `step` that a restore here found damaged aside
    (to `<step>.damaged`, which orbax does not list), so that the resumed run can save those
    steps again; nothing is deleted on the strength of one failed read."""
    damaged = [s for s in sorted(self._mngr.all_steps()) if s >= step and s in self._damaged]
    if not damaged:
      return
    if jax.process_index() == 0:
      for s in damaged:
        aside = f"{self._step_dir(s)}.damaged"
        n = 1
        while os.path.exists(aside):
          n += 1
          aside = f"{self._step_dir(s)}.damaged-{n}"
        os.rename(self._step_dir(s), aside)
        logging.warning("moved the damaged checkpoint %s (%s) aside to %s, to save step %d "
                        "again; delete it when done.", self._step_dir(s), self._damaged[s],
                        aside, s)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"rlhf_jax_checkpoint_aside_{step}")
    for s in damaged:
      del self._damaged[s]
    self._mngr.reload()

  def close(self):
    self._mngr.close()


def _trained(state):
  """What a checkpoint holds of `state`: a `TrainState`'s trained part (LoRA: no frozen
  base), or any object with `params`, `step`, `opt_state` as it is."""
  return state.trained() if hasattr(state, "trained") else state


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of arrays or of abstract arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _reason(e: BaseException) -> str:
  """One line of an orbax/tensorstore error: its type and message without the tensorstore
  spec, the middle elided when long (the file is named early, the cause last)."""
  text = str(e).split(" [tensorstore_spec")[0]
  text = re.sub(r'Error opening "\w+" driver: ', "", text)
  text = re.sub(r"\s+", " ", text).strip().strip("'\"")
  if len(text) > 320:
    text = f"{text[:140]} … {text[-170:]}"
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_no_space(e: BaseException) -> bool:
  """Whether `e` (or an exception it was raised from) is a full disk or a file-size limit;
  tensorstore reports those as text in a ValueError."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in NO_SPACE:
      return True
    if re.search(r"No space left on device|File too large|Disk quota exceeded|ENOSPC|EFBIG",
                 str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False
