"""Helpers shared by the test files.

Imported as `import testing`: tests/ is not a package, and both ways of running a test put
this directory on sys.path (pytest's default "prepend" import mode for rootdir-level test
files, and `python tests/<name>_test.py`, whose directory is sys.path[0]).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_state(create: Callable[[], nnx.Module], seed: int, std: float = 0.1,
                 stds: Mapping[str, float] | None = None,
                 dtype: Any = None) -> tuple[nnx.GraphDef, nnx.State, dict]:
  """(graphdef, state, float64 numpy values) of `create()` with every leaf drawn from numpy:
  norm scales (`scale`) 1 + 0.2 N(0, 1), leaves named in `stds` N(0, stds[name]), all others
  N(0, std). The state holds the values cast to `dtype` (default: each leaf's own dtype).

  Cheaper than a real init (no per-shape compiles, `create` only runs under eval_shape) and
  makes every parameter matter: with the default all-ones norm scales a reference that
  forgot them would still pass. Leaves are drawn in the pure dict's order, one
  `standard_normal(shape)` each, so a seed gives the same values whatever the stds.
  """
  graphdef, state = nnx.split(nnx.eval_shape(create))
  stds = stds or {}
  rng = np.random.default_rng(seed)

  def fill(tree):
    values, cast = {}, {}
    for k, v in tree.items():
      if isinstance(v, dict):
        values[k], cast[k] = fill(v)
      else:
        x = rng.standard_normal(v.shape)
        values[k] = 1.0 + 0.2 * x if k == "scale" else stds.get(k, std) * x
        cast[k] = jnp.asarray(values[k], v.dtype if dtype is None else dtype)
    return values, cast

  values, cast = fill(nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, cast)
  return graphdef, state, values


def left_padded_batch(rng: np.random.Generator, lengths, total_len: int, vocab: int):
  """Tokens [B, T] drawn from [0, vocab) (pads hold random garbage tokens, not the pad id)
  and a left-padded mask [B, T] with `lengths[i]` ones at the end of row i."""
  b = len(lengths)
  tokens = rng.integers(0, vocab, size=(b, total_len)).astype(np.int32)
  mask = np.zeros((b, total_len), np.int32)
  for i, n in enumerate(lengths):
    mask[i, total_len - n:] = 1
  return tokens, mask


# --- One trained pipeline per test process -------------------------------------------------

_SHARED: dict = {}

# What the shared pipeline sets on top of the `test` preset, as dotted config keys (so that a
# command line can pass the same: `--config.<key>=<value>`).
PIPELINE_OVERRIDES = {
    "mesh.num_devices": 1,  # in-process runs stay on one device; sharding tests cover 8
    "sft.train.eval_every": 10,
    "rm.data.num_train_prompts": 2048, "rm.data.num_eval_prompts": 256,
    "rm.optim.learning_rate": 2e-3, "rm.optim.decay_steps": 100,
    "rm.train.num_steps": 100, "rm.train.eval_every": 100, "rm.train.checkpoint_every": 50,
    "ppo.adaptive_kl": True, "ppo.kl_target": 0.01, "ppo.kl_horizon": 100,
    "ppo.train.eval_every": 3,  # held-out eval/* at iterations 3 and 6
}


def pipeline_config(stage: str = "ppo", num_devices: int = 1):
  """`configs/<stage>.py:test` as the shared pipeline runs it, on `num_devices` devices.

  More preference pairs and RM steps than the preset, so the RM's held-out accuracy is
  clearly above chance (measured: gold agreement 0.74-0.85 over seeds 0-3; an untrained RM
  gets 0.50); SFT evaluates every 10 steps; PPO adapts its KL coefficient, so resuming must
  restore it.
  """
  from rlhf_jax import config as config_lib, scale  # pylint: disable=g-import-not-at-top
  cfg = config_lib.get_config(stage, "test")
  scale.apply_overrides(cfg, {k: v for k, v in PIPELINE_OVERRIDES.items()
                              if k.split(".")[0] in cfg})
  cfg.mesh.num_devices = num_devices
  return cfg


def shared_pipeline():
  """(workdir, pipeline.Result) of one SFT -> preferences -> RM -> PPO run of
  `pipeline_config()`, trained on first use and shared by every test of this process (the
  folder goes when the process ends). Tests must not change its files."""
  if "run" not in _SHARED:
    from rlhf_jax import pipeline  # pylint: disable=g-import-not-at-top
    workdir = tempfile.mkdtemp(prefix="rlhf_jax_shared_pipeline_")
    atexit.register(shutil.rmtree, workdir, True)
    _SHARED["run"] = (workdir, pipeline.run(pipeline_config(), workdir, keep_states=True))
  return _SHARED["run"]


def from_shared(cfg):
  """`cfg` (a PPO or GRPO config) set to start from the shared pipeline's SFT policy and, when
  it scores with a reward model, its RM."""
  workdir, _ = shared_pipeline()
  cfg.sft_checkpoint = os.path.join(workdir, "sft")
  if cfg[cfg.stage].reward == "model":
    cfg.rm_checkpoint = os.path.join(workdir, "rm")
  return cfg


def metric_rows(workdir: str, stage: str | None = None) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (of one stage, if given)."""
  from rlhf_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return metrics.read_rows(workdir, stage)
