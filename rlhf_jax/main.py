"""Entry point: `python -m rlhf_jax.main --config=configs/ppo.py [--workdir=DIR]`.

Runs the stage named by `config.stage` in `--workdir` (default ./workdir). Metrics go to
`<workdir>/metrics.jsonl` and TensorBoard files to `<workdir>/tensorboard`; the final metrics
are printed as one JSON line at the end.
"""

from __future__ import annotations

import json
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ppo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where the tokenizer, checkpoints "
                               "(<workdir>/<stage>/checkpoints) and metrics.jsonl go. Rerunning "
                               "with the same workdir resumes from the latest checkpoint.")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache directory: '' = "
    "$JAX_COMPILATION_CACHE_DIR if set, else <workdir>/jax_cache; 'off' = none. Reruns and "
    "resumed runs then load their compiled programs instead of compiling them again.")

STAGES = ("sft", "rm", "ppo")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ppo.py")
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage is {config.stage!r}; stages available: {STAGES}.")
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  _use_compilation_cache(_COMPILATION_CACHE.value, workdir)
  with open(os.path.join(workdir, f"config_{config.stage}.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("config:\n%s", config)

  # Imported here so that --help and config errors come back fast.
  from rlhf_jax import ppo, rm, sft  # pylint: disable=g-import-not-at-top

  result = {"sft": sft.run, "rm": rm.run, "ppo": ppo.run}[config.stage](config, workdir)
  print(json.dumps({"stage": config.stage, "workdir": workdir, **result["metrics"]}))


def _use_compilation_cache(setting: str, workdir: str) -> None:
  """Compiling is much of a short run's time and, on CPU, of its peak memory (the PPO
  benchmark's peak RSS is ~150 MiB lower when its programs come from the cache)."""
  import jax  # pylint: disable=g-import-not-at-top
  if setting == "off":
    jax.config.update("jax_enable_compilation_cache", False)
  elif setting or not jax.config.jax_compilation_cache_dir:  # keep one set by the environment
    path = os.path.expanduser(setting) if setting else os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
  on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
  logging.info("compilation cache: %s", on or "off")


class _QuietLibraries:
  """Drops INFO chatter of orbax (a dozen lines per checkpoint); warnings still pass."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
