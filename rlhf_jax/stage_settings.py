"""The settings that decide what a finished stage holds, saved with it and checked on reuse.

A finished stage folder keeps `settings.json`: the config keys its result depends on
(flattened, e.g. `model.d_model`, `sft.optim.learning_rate`) and, for a later stage, the
settings of the stages it was built on. When the pipeline finds a finished stage, it compares
them with the current config: a difference is an error naming the keys that changed and the
two ways out (another `--workdir`, or `--config.retrain=<stage>`, which moves the old folders
aside instead of deleting them). Keys that change only how a run is watched (logging, eval,
checkpoint cadence, samples shown), the mesh, and `num_steps` (raising it resumes and
continues the run) are not part of it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from rlhf_jax.fileio import write_json
from rlhf_jax.models import lora

FILE = "settings.json"
# Shared keys each stage's result depends on (beyond its own section).
_SHARED = {
    "sft": ("seed", "init_from", "model", "tokenizer", "data"),
    "rm": ("seed", "init_from", "model", "tokenizer", "data", "sampling"),
    "ppo": ("seed", "init_from", "model", "tokenizer", "data", "sampling", "sft_checkpoint",
            "rm_checkpoint"),
}
_UPSTREAM = {"sft": (), "rm": ("sft",)}
for _stage in ("grpo", "rloo", "reinforce_pp", "dpo", "best_of_n"):
  _SHARED[_stage] = _SHARED["ppo"]
for _stage in _SHARED:
  _UPSTREAM.setdefault(_stage, ("sft", "rm"))
_WATCHING = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "num_samples_shown", "sample_every", "num_steps")


def _flatten(prefix: str, value, out: dict[str, Any]) -> None:
  if hasattr(value, "items"):
    for k, v in value.items():
      _flatten(f"{prefix}.{k}" if prefix else k, v, out)
  else:
    out[prefix] = list(value) if isinstance(value, tuple) else value


def settings(config, stage: str) -> dict[str, Any]:
  """The flattened config keys `stage`'s result depends on, upstream stages' included."""
  out: dict[str, Any] = {}
  for name in _UPSTREAM[stage] + (stage,):
    for key in _SHARED[name]:
      if key in config:
        _flatten(key, config[key].to_dict() if hasattr(config[key], "to_dict")
                 else config[key], out)
    section = config[name].to_dict()
    section.pop("train", None)
    section.pop("num_iterations", None)  # PPO's num_steps: raising it continues the run
    _flatten(name, section, out)
    train = {k: v for k, v in config[name].train.to_dict().items() if k not in _WATCHING}
    _flatten(f"{name}.train", train, out)
    adapters = lora.for_stage(config, name)
    if adapters.enabled:  # recorded only when on, so older folders (no LoRA) still match
      _flatten(f"{name}.lora", adapters.to_dict(), out)
  return out


def save(out_dir: str, config, stage: str) -> None:
  write_json(os.path.join(out_dir, FILE), settings(config, stage))


def check(out_dir: str, config, stage: str) -> None:
  """Raises ValueError when the finished `out_dir` was made with other settings."""
  path = os.path.join(out_dir, FILE)
  if not os.path.exists(path):
    logging.warning("%s has no %s (made by an older version): reusing it unchecked.",
                    out_dir, FILE)
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(settings(config, stage)))  # tuples -> lists, as saved
  # A key the folder does not know came with a newer version; left off (False, 0, "") it
  # keeps the old behaviour (e.g. data.packing=False), so it does not refuse a finished run.
  unknown = sorted(k for k in set(new) - set(old) if not new[k])
  if unknown:
    logging.info("%s predates the settings %s (off here): not checked.", out_dir,
                 ", ".join(unknown))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                   and k not in unknown)
  if changed:
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise ValueError(f"{out_dir} is a finished {stage} run made with other settings ({shown}"
                     f"{more}); use another --workdir, or --config.retrain={stage} to train "
                     f"it again (the old folder is kept as {os.path.basename(out_dir)}.old-N).")


def move_aside(workdir: str, stages) -> None:
  """Renames each existing `<workdir>/<stage>` to `<stage>.old-N` (nothing is deleted)."""
  for stage in stages:
    src = os.path.join(workdir, stage)
    if not os.path.exists(src):
      continue
    n = 1
    while os.path.exists(f"{src}.old-{n}"):
      n += 1
    os.rename(src, f"{src}.old-{n}")
    logging.info("[pipeline] retrain: moved %s to %s.old-%d", src, src, n)
