"""Entry point: `python -m rlhf_jax.main --config=configs/ppo.py [--workdir=DIR]`.

Runs the pipeline up to the stage named by `config.stage` in `--workdir` (default ./workdir):
configs/sft.py runs SFT, configs/rm.py SFT and the RM, configs/ppo.py all of them, reusing
finished stages and resuming an interrupted one (`pipeline.py`). Metrics go to
`<workdir>/metrics.jsonl` and TensorBoard files to `<workdir>/tensorboard`; the final metrics
are printed as one JSON line at the end. Several processes (hosts) run the same command;
`--distributed` and its flags connect them (see `distributed.py`), and only process 0 logs,
writes metrics and prints. At start-up the per-device memory estimate is logged (`memory.py`).
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ppo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where the tokenizer, checkpoints "
                               "(<workdir>/<stage>/checkpoints) and metrics.jsonl go. Rerunning "
                               "with the same workdir resumes from the latest checkpoint.")

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runs: auto = when --coordinator_address is given or a launcher (srun, "
    "mpirun, a multi-host TPU slice) started several processes; on = always (JAX detects TPU "
    "pods, SLURM, Open MPI); off = one process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0, reachable from every process; needs "
    "--num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (0: detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0 .. "
                                   "num_processes - 1 (-1: detect).")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache directory: '' = "
    "$JAX_COMPILATION_CACHE_DIR if set, else <workdir>/jax_cache; 'off' = none. Reruns and "
    "resumed runs then load their compiled programs instead of compiling them again.")

_VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors", False, "Print the full Python traceback of an expected error (a bad "
    "config value, bad data, a missing or damaged file, a non-finite loss) instead of one line.")

# What a user can cause and fix: reported as one line (the traceback with --verbose_errors).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, KeyError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ppo.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is empty; name a directory (default ./workdir).")
  try:
    run(config, _WORKDIR.value)
  except EXPECTED_ERRORS as e:
    if _VERBOSE_ERRORS.value:
      raise
    message = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
    sys.stderr.write(f"error: {type(e).__name__}: {' '.join(message.split())}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    # Skip interpreter shutdown: orbax's and tensorstore's background threads would print
    # "Event loop is closed" tracebacks after the one line above.
    os._exit(1)  # pylint: disable=protected-access


def run(config, workdir: str) -> None:
  """Runs `config` in `workdir` as the command line does (used by `rlhf_jax.compare`)."""
  # Imported here so that --help comes back fast.
  from rlhf_jax import config as config_lib, distributed, fileio, memory, validate  # pylint: disable=g-import-not-at-top
  validate.check(config)  # before anything touches a device or the workdir
  # Before anything touches a device: every process must see the global device list.
  info = distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                _PROCESS_ID.value)
  distributed.log_topology(info)
  if not distributed.is_main_process():  # one copy of the logs: process 0's
    logging.set_verbosity(logging.WARNING)
  os.makedirs(workdir, exist_ok=True)
  _use_compilation_cache(_COMPILATION_CACHE.value, workdir)
  logging.info("config:\n%s", config)
  for stage in config_lib.stages_of(config):  # memory.MODELLED_STAGES: every stage
    try:
      logging.info("%s", memory.report(memory.estimate(config, stage=stage)))
    except Exception as e:  # pylint: disable=broad-except
      # Advice, not a precondition: a shape the estimate cannot model must not stop the run.
      logging.warning("memory estimate unavailable: %s: %s", type(e).__name__, e)

  from rlhf_jax import pipeline  # pylint: disable=g-import-not-at-top

  result = pipeline.run(config, workdir)
  if distributed.is_main_process():
    # The config of the last successful run (a failed rerun leaves the previous one).
    fileio.atomic_write(os.path.join(workdir, f"config_{config.stage}.json"),
                        config.to_json_best_effort(indent=2))
    final = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
             for k, v in result.metrics.items()}
    print(json.dumps({"stage": config.stage, "workdir": workdir, **final}, allow_nan=False))


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
