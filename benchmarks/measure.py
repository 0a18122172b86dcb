"""Timing with a contention guard, peak RSS, machine description, matmul peak.

The guard is the one of the peer harness (`../shared/bench/peer_hf.py`), so both sides
report the same `cpu` fields:

* before each timed attempt, wait (untimed, at most `QUIET["max_wait_s"]`) until other
  processes use less than `QUIET["threshold"]` of the machine's CPU over a 0.5 s window;
* an attempt during which other processes used >= threshold of the CPU is discarded and
  retried (at most `max_retries` extra attempts);
* `cpu.contended` is true when fewer than `repeats` clean attempts exist; the median is then
  taken over all attempts and should not be trusted.

"foreign" CPU is whole-machine busy time from /proc/stat minus this process's own CPU time
(`os.times()`, which counts every thread of the process, XLA's thread pool included).
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from typing import Callable

QUIET = {"max_wait_s": 30.0, "threshold": 0.10}  # set from --wait-quiet / --quiet-threshold


def _proc_stat():
  with open("/proc/stat") as fh:
    f = [int(x) for x in fh.readline().split()[1:]]
  return sum(f[:8]), f[3] + f[4]  # total, idle+iowait (jiffies)


def _own_cpu():
  t = os.times()
  return t[0] + t[1]


class CpuMeter:
  """Measures one timed region: `wall`, `own_cpu_util` (own CPU s / wall s, about 2.0 when
  two threads are busy) and `foreign_cpu_frac` (share of the machine's CPU capacity used by
  other processes; 0.0 = quiet)."""

  def __enter__(self):
    self.s0 = _proc_stat()
    self.c0 = _own_cpu()
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t0
    own = _own_cpu() - self.c0
    tot1, idle1 = _proc_stat()
    busy = ((tot1 - self.s0[0]) - (idle1 - self.s0[1])) / os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    self.own_cpu_util = own / max(self.wall, 1e-9)
    self.foreign_cpu_frac = max(0.0, busy - own) / (max(self.wall, 1e-9) * ncpu)
    return False


def wait_quiet() -> float:
  """Untimed: wait (at most QUIET['max_wait_s']) until other processes use less than
  QUIET['threshold'] of the machine over a 0.5 s window. Returns seconds waited."""
  if QUIET["max_wait_s"] <= 0:
    return 0.0
  t0 = time.perf_counter()
  while True:
    with CpuMeter() as m:
      time.sleep(0.5)
    if (m.foreign_cpu_frac < QUIET["threshold"]
        or time.perf_counter() - t0 >= QUIET["max_wait_s"]):
      return time.perf_counter() - t0


def summarize(times, own, foreign, waited, repeats) -> dict:
  """Median over the first `repeats` clean attempts when there are that many; otherwise over
  all attempts, flagged `cpu.contended`."""
  thr = QUIET["threshold"]
  clean = [t for t, f in zip(times, foreign) if f < thr]
  use_clean = len(clean) >= repeats
  sel = clean[:repeats] if use_clean else list(times)
  return {
      "median_s": statistics.median(sel),
      "min_s": min(sel),
      "times_s": sel,
      "cpu": {
          "contended": not use_clean,
          "own_cpu_util_median": round(statistics.median(own), 3),
          "foreign_cpu_frac_per_attempt": [round(f, 3) for f in foreign],
          "times_s_all_attempts": [round(t, 4) for t in times],
          "discarded_contended_attempts": len(times) - len(clean),
          "waited_for_quiet_s": round(waited, 1),
          "quiet_threshold": thr,
      },
  }


class Attempts:
  """Collects guarded attempts; `done` once `repeats` are clean or retries are spent."""

  def __init__(self, repeats: int, max_retries: int):
    self.repeats, self.max_retries = repeats, max_retries
    self.times, self.own, self.foreign, self.extra = [], [], [], []
    self.waited = 0.0

  @property
  def done(self) -> bool:
    n_clean = sum(f < QUIET["threshold"] for f in self.foreign)
    return n_clean >= self.repeats or len(self.times) >= self.repeats + self.max_retries

  def record(self, m: CpuMeter, extra=None):
    self.times.append(m.wall)
    self.own.append(m.own_cpu_util)
    self.foreign.append(m.foreign_cpu_frac)
    self.extra.append(extra)

  def selected_extra(self):
    """`extra` of the attempts the median was taken over (same rule as `summarize`)."""
    thr = QUIET["threshold"]
    clean = [e for e, f in zip(self.extra, self.foreign) if f < thr]
    return clean[:self.repeats] if len(clean) >= self.repeats else list(self.extra)

  def summary(self) -> dict:
    return summarize(self.times, self.own, self.foreign, self.waited, self.repeats)


def time_repeats(fn: Callable[[], object], warmup: int, repeats: int, max_retries: int) -> dict:
  """`warmup` untimed calls, then individually timed calls, each preceded by an untimed
  wait_quiet(); contended attempts are discarded and retried (peer_hf.time_repeats)."""
  att = Attempts(repeats, max_retries)
  att.waited = wait_quiet()
  for _ in range(warmup):
    fn()
  while not att.done:
    att.waited += wait_quiet()
    with CpuMeter() as m:
      fn()
    att.record(m)
  return att.summary()


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover
    return os.cpu_count() or 1


def machine() -> dict:
  cpu, flags, family, model = "", "", "", ""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and not cpu:
          cpu = val
        elif key == "flags" and not flags:
          flags = " " + val
        elif key == "cpu family" and not family:
          family = val
        elif key == "model" and not model:
          model = val
  except OSError:
    pass
  mem = 0.0
  try:
    with open("/proc/meminfo") as fh:
      mem = int(fh.readline().split()[1]) / 2**20
  except (OSError, ValueError, IndexError):
    pass
  isa = [x for x in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")
         if f" {x} " in flags + " "]
  # AMD family 23 = Zen 1/2, 25 = Zen 3/4, 26 = Zen 5 (what /proc/cpuinfo says under KVM).
  uarch = {"23": "Zen 1/2", "25": "Zen 3/4", "26": "Zen 5"}.get(family, "") if "AMD" in cpu else ""
  return {"cpu": cpu or platform.processor(), "cpu_family": family, "cpu_model": model,
          "uarch": uarch, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "isa": isa,
          "host": platform.node(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def versions() -> dict:
  import flax
  import jax
  import jaxlib
  import numpy
  import optax
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": numpy.__version__}


def matmul_peak(sizes=(1024, 2048), dtype: str = "float32", warmup: int = 2,
                repeats: int = 5, max_retries: int = 5) -> dict:
  """Best FLOP/s of a jitted square matmul on the default device (guarded attempts); the
  MFU denominator. Takes the best size's median."""
  import jax

  best = None
  per_size = {}
  for n in sizes:
    k1, k2 = jax.random.split(jax.random.PRNGKey(n))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    stats = time_repeats(lambda: f(a, b).block_until_ready(), warmup, repeats, max_retries)
    flops = 2.0 * n ** 3
    per_size[n] = {"median_s": stats["median_s"], "flops_per_s": flops / stats["median_s"],
                   "contended": stats["cpu"]["contended"]}
    if best is None or per_size[n]["flops_per_s"] > best[1]["flops_per_s"]:
      best = (n, per_size[n], stats)
  n, rec, stats = best
  return {"value": rec["flops_per_s"], "size": n, "per_size": per_size, **stats}
