"""Multi-process runs on JAX's own distributed runtime: one process per host (TPU), or per GPU.

Every process runs the same program on the same config. `initialize` connects them
(`jax.distributed.initialize`) before anything touches a device; from then on
`jax.devices()` lists the devices of every process, a mesh spans them all, and each process
feeds only its own rows of every global batch (`sharding.shard_batch`). What the host needs
whole (decoded samples, experience for minibatching) is gathered with `sharding.to_host`,
so every process does the same host-side bookkeeping; only process 0 writes metrics, logs
and the final line, while orbax checkpoints are written by all processes together.

When to connect (`--distributed`):
  auto  (default) when `--coordinator_address` is given, or the environment is a launcher
        that started several processes: SLURM (`srun`, more than one task), Open MPI
        (`mpirun`), a multi-host TPU slice that exports its worker list (GKE, multislice), or
        `JAX_COORDINATOR_ADDRESS`. Otherwise a single process, and nothing happens.
  on    always: JAX fills in what the flags leave unset from the cluster (TPU-VM pods, where
        the worker list comes from the metadata server, SLURM, Open MPI, Kubernetes).
  off   never, whatever the environment says.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
from absl import logging

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int
  platform: str
  launcher: str  # "single process", "flags", or the detected environment


def _int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, ""))
  except ValueError:
    return 0


def detect_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this process was started by, or None for a lone process.

  Only environments that say *several* processes exist count: a SLURM batch step that runs
  `python` directly (one task), or a single-host TPU VM, stays a single process.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  # srun exports SLURM_STEP_NUM_TASKS for the step it launched; the batch script itself has
  # SLURM_NTASKS of the whole allocation but is one process.
  if "SLURM_PROCID" in environ and _int(environ, "SLURM_STEP_NUM_TASKS") > 1:
    return "slurm"
  if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "open-mpi"
  if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, initialization_timeout_s: int = 300) -> ProcessInfo:
  """Connects this process to the others (or does nothing for one process); see the module doc.

  Must run before the first JAX computation. `coordinator_address` is `host:port` of process
  0, reachable from every process; with it, `num_processes` and `process_id` are required.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed is {mode!r}; choose one of {MODES}.")
  explicit = bool(coordinator_address)
  if mode == "off":
    if explicit or num_processes > 1:
      raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes; "
                       "drop one of them.")
    return _info("single process")
  if explicit and (num_processes < 1 or process_id < 0):
    raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes (>= 1) "
                     "and --process_id (0 .. num_processes - 1) too; got num_processes="
                     f"{num_processes}, process_id={process_id}.")
  if not explicit and (num_processes > 0 or process_id >= 0) and mode == "auto":
    raise ValueError("--num_processes/--process_id need --coordinator_address (host:port of "
                     "process 0), or --distributed=on on a cluster JAX detects by itself.")
  launcher = "flags" if explicit else detect_launcher()
  if mode == "auto" and launcher is None:
    return _info("single process")
  if jax.distributed.is_initialized():
    return _info(launcher or "already initialized")
  # CPU devices of different processes talk through gloo (TCP). Recent JAX defaults to it;
  # older releases had no CPU collectives unless asked, and then hang in the first psum.
  if not getattr(jax.config, "jax_cpu_collectives_implementation", None):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
        initialization_timeout=initialization_timeout_s)
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(
        f"jax.distributed.initialize failed ({launcher or 'auto-detect'}): {e}\nCheck that every "
        "process got the same --coordinator_address (host:port of process 0, reachable from "
        "all hosts), --num_processes and a distinct --process_id, or use --distributed=off "
        "for a single process.") from e
  return _info(launcher or "auto-detected")


def _info(launcher: str) -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count(), jax.devices()[0].platform, launcher)


def is_main_process() -> bool:
  """Process 0: the one that writes metrics, logs and files only one copy of is needed of."""
  return jax.process_index() == 0


def log_topology(info: ProcessInfo) -> None:
  logging.info("process %d of %d (%s): %d local / %d global %s device(s)", info.process_index,
               info.process_count, info.launcher, info.local_devices, info.global_devices,
               info.platform)
