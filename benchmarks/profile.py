"""Where the time goes: per-HLO-op breakdown of each measurement from a `jax.profiler` trace.

    python -m benchmarks.profile                       # all four, markdown on stdout
    python -m benchmarks.profile --only generate --units 3 --top 25 --json prof.json

The measurement is set up exactly as in `benchmarks.run` (same library code, same shapes),
warmed up (compiled), then `--units` timed units run under `jax.profiler` with host tracing
at level 3, which makes XLA:CPU's thunk executor record one event per executed HLO op
(fusion, dot, copy, while, ...), tagged with its module and op name. Events are summed per
(module, op) and joined with the compiled HLO text (op kinds inside each fusion, the JAX
source `op_name`), then grouped:

  matmul       fusions containing a dot / convolution (incl. XNNPACK `ynn_fusion`s)
  reduction    fusions with a reduce (softmax, log-softmax, norms, losses, sums)
  elementwise  other loop fusions (activations, RoPE, Adam update, masks, ...)
  data         copy, transpose, concatenate, dynamic-(update-)slice, gather/scatter, pad
  control      while loops, conditionals, calls (their bodies are counted separately)
  rng          random bits (threefry / rng-bit-generator)

Thunks on different threads can overlap, so the op sum may differ from the wall time; the
`host` line is wall time not covered by any XLA op (Python, dispatch, transfers, waiting).
Timings on a contended machine are inflated, but the shares are still informative.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> dict[str, dict]:
  """op name -> {opcode, kind, calls, op_name, inner (opcodes of the called computations)}."""
  comps: dict[str, list[str]] = collections.defaultdict(list)
  ops: dict[str, dict] = {}
  current = None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, _, opcode = m.groups()
      info = {"opcode": opcode}
      k = re.search(r"kind=(\w+)", line)
      if k:
        info["kind"] = k.group(1)
      c = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
      if c:
        info["calls"] = c
      on = re.search(r'op_name="([^"]*)"', line)
      if on:
        info["op_name"] = on.group(1)
      ops.setdefault(name, info)
      if current:
        comps[current].append(opcode)
      continue
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
  for info in ops.values():
    inner = set()
    for c in info.get("calls", []):
      inner.update(comps.get(c, []))
    info["inner"] = sorted(inner - {"parameter", "constant", "broadcast", "bitcast", "tuple",
                                    "get-tuple-element"})
  return ops


def category(op: str, info: dict) -> str:
  code = info.get("opcode", "")
  inner = set(info.get("inner", []))
  if op.startswith("ynn") or code in ("dot", "convolution") or inner & {"dot", "convolution"}:
    return "matmul"
  if code == "custom-call" and re.search(r"onednn|matmul|xnn|ynn", op):
    return "matmul"
  if code in ("while", "conditional", "call"):
    return "control"
  if code == "rng-bit-generator" or inner & {"rng-bit-generator", "rng"} or "threefry" in op:
    return "rng"
  if code in ("reduce", "reduce-window") or "reduce" in inner:
    return "reduction"
  data_ops = {"copy", "transpose", "concatenate", "dynamic-slice", "dynamic-update-slice",
              "gather", "scatter", "pad", "slice", "reverse", "sort", "iota"}
  if code in data_ops or (inner and inner <= data_ops | {"select", "compare", "convert",
                                                         "clamp", "add", "reshape"}
                          and inner & data_ops):
    return "data"
  return "elementwise"


def _trace_events(logdir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise RuntimeError(f"no perfetto trace under {logdir}")
  with gzip.open(paths[-1]) as fh:
    d = json.load(fh)
  return d["traceEvents"] if isinstance(d, dict) else d


def profile(prep, units: int = 3, warmup: int = 1) -> dict:
  import jax
  from rlhf_jax import sharding

  for _ in range(warmup):
    prep.run()
  hlo: dict[str, dict] = {}
  with sharding.use_mesh(prep.mesh):
    for _, fn, fargs in prep.programs():
      text = fn.lower(*fargs).compile().as_text()
      module = re.search(r"HloModule\s+([\w.\-]+)", text).group(1)
      hlo[module] = parse_hlo(text)
  logdir = tempfile.mkdtemp(prefix="rlhf_jax_prof_")
  opts = jax.profiler.ProfileOptions()
  opts.host_tracer_level = 3
  opts.python_tracer_level = 0
  jax.profiler.start_trace(logdir, create_perfetto_trace=True, profiler_options=opts)
  t0 = time.perf_counter()
  for _ in range(units):
    prep.run()
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()

  per_op = collections.defaultdict(lambda: [0.0, 0])
  # Busy intervals per thread, to get the wall time covered by at least one XLA op.
  intervals = []
  for e in _trace_events(logdir):
    a = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in a:
      continue
    key = (a.get("hlo_module", "?"), a["hlo_op"])
    per_op[key][0] += e.get("dur", 0.0) / 1e6
    per_op[key][1] += 1
    intervals.append((e["ts"], e["ts"] + e.get("dur", 0.0)))
  covered, end = 0.0, -1.0
  for s, t in sorted(intervals):
    if t <= end:
      continue
    covered += t - max(s, end)
    end = t
  covered /= 1e6

  rows = []
  cats = collections.Counter()
  for (module, op), (secs, count) in per_op.items():
    info = hlo.get(module, {}).get(op, {})
    # While/call thunks enclose their bodies' thunks: count them as control overhead only.
    cat = category(op, info)
    if cat == "control":
      continue
    cats[cat] += secs
    rows.append({"module": module, "op": op, "category": cat, "s_per_unit": secs / units,
                 "calls_per_unit": count / units, "inner": ",".join(info.get("inner", [])[:8]),
                 "op_name": info.get("op_name", "")})
  op_sum = sum(cats.values())
  rows.sort(key=lambda r: -r["s_per_unit"])
  n_thunks = sum(c for (_, _), (_, c) in per_op.items()) / units
  return {
      "wall_s_per_unit": wall / units,
      "op_sum_s_per_unit": op_sum / units,
      "xla_busy_wall_s_per_unit": covered / units,
      "host_s_per_unit": max(wall - covered, 0.0) / units,
      "thunks_per_unit": n_thunks,
      "categories_s_per_unit": {k: v / units for k, v in cats.most_common()},
      "ops": rows,
      "trace_dir": logdir,  # open its perfetto_trace.json.gz in ui.perfetto.dev
  }


def to_markdown(name: str, res: dict, top: int) -> str:
  w = res["wall_s_per_unit"]
  lines = [f"### {name}", "",
           f"wall {w:.3f} s/unit; XLA ops busy {res['xla_busy_wall_s_per_unit']:.3f} s "
           f"(op-time sum {res['op_sum_s_per_unit']:.3f} s); host/other "
           f"{res['host_s_per_unit']:.3f} s; {res['thunks_per_unit']:.0f} op executions/unit; "
           f"trace: {res['trace_dir']}",
           "", "| category | s/unit | share of op time |", "| --- | --- | --- |"]
  tot = max(res["op_sum_s_per_unit"], 1e-12)
  for k, v in res["categories_s_per_unit"].items():
    lines.append(f"| {k} | {v:.3f} | {100 * v / tot:.1f}% |")
  lines += ["", "| op (module) | category | ms/unit | calls/unit | share | contains | JAX op |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in res["ops"][:top]:
    src = r["op_name"]
    src = ("…" + src[-70:]) if len(src) > 70 else src
    lines.append(f"| {r['op']} ({r['module']}) | {r['category']} | {1e3 * r['s_per_unit']:.1f} | "
                 f"{r['calls_per_unit']:.0f} | {100 * r['s_per_unit'] / tot:.1f}% | "
                 f"{r['inner']} | `{src}` |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", action="append",
                 choices=("generate", "sft_step", "rm_step", "ppo_iteration"))
  p.add_argument("--units", type=int, default=3, help="traced calls / iterations")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the full breakdown here")
  args = p.parse_args(argv)
  from benchmarks import benches

  real_stdout, sys.stdout = sys.stdout, sys.stderr
  out = {}
  try:
    for name in args.only or ["generate", "sft_step", "rm_step", "ppo_iteration"]:
      if name == "ppo_iteration":
        prep = benches.PreparedPPO(args.seed, iters=args.units + args.warmup)
      else:
        prep = getattr(benches, f"prepare_{name}")(args.seed)
      out[name] = profile(prep, args.units, args.warmup)
      del prep
      print(to_markdown(name, out[name], args.top), file=real_stdout, flush=True)
  finally:
    sys.stdout = real_stdout
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
