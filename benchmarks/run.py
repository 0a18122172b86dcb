r"""Benchmarks of rlhf_jax against the PyTorch/transformers/TRL peer, on the same shapes.

    python -m benchmarks.run --out results_jax.jsonl          # all four, ~3-5 min quiet
    python -m benchmarks.run --only ppo_iteration              # one measurement
    python -m benchmarks.run --compare ../shared/bench/results_peer_hf.jsonl \
        --ours results_jax.jsonl --readme README.md            # table -> README section
    python -m benchmarks.run --rounds 3 --with-peer /work/peer_venv/bin/python \
        --out ours.jsonl --peer-out peer.jsonl --readme README.md   # alternate both sides
    python -m benchmarks.run --preset 1b                       # accelerator: SFT-step MFU, ~1B
    python -m benchmarks.run --preset 7b --aot                 # compile + XLA memory, 7B, any host

stdout gets one JSON line per measurement (the peer's fields: bench, metric, value,
median_s, min_s, times_s, cpu, peak_rss_mib, shape, versions; plus compile_s, first_call_s,
model_flops, mfu, hlo_flops, ...). Library chatter goes to stderr. Each measurement runs in
its own Python process (peak RSS = that measurement alone); the machine's matmul peak (the
MFU denominator) is measured first, in its own process too. Timing rules and the contention
guard are the peer's: warm-up calls, then guarded attempts (attempts during which other
processes used >= 10% of the CPU are discarded and retried), median reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if not __package__:  # run as a script (python benchmarks/run.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.paths import PEER_SCRIPT, REPO, SHIPPED_PEER  # pylint: disable=g-import-not-at-top
BENCHES = ("generate", "sft_step", "rm_step", "ppo_iteration")
ALL = BENCHES + ("matmul_peak",)


def _parser():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", choices=ALL, action="append", help="run only these (repeatable)")
  p.add_argument("--threads", type=int, default=0,
                 help="CPU cores the process may use (sched_setaffinity before JAX starts); "
                      "0 = all (2 on the reference machine = the peer's --threads 2)")
  p.add_argument("--warmup", type=int, default=3, help="warm-up calls for generate/sft/rm "
                 "(the first one compiles)")
  p.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
  p.add_argument("--ppo-warmup", type=int, default=2, help="PPO iterations discarded as warm-up")
  p.add_argument("--ppo-iters", type=int, default=5, help="PPO iterations timed")
  p.add_argument("--wait-quiet", type=float, default=30.0,
                 help="before each timed attempt wait (untimed) up to this many s for other "
                      "processes to use < --quiet-threshold of the machine; 0 = never wait")
  p.add_argument("--quiet-threshold", type=float, default=0.10)
  p.add_argument("--max-retries", type=int, default=10,
                 help="extra attempts allowed to replace ones disturbed by other processes")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--inproc", action="store_true",
                 help="run everything in this process (peak RSS then cumulative)")
  p.add_argument("--out", help="also append the JSON lines to this file")
  p.add_argument("--peak-flops", type=float, default=0.0,
                 help="matmul peak FLOP/s for MFU; 0 = measure it (own process)")
  p.add_argument("--peak-dtype", default="float32")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  # side by side with the peer
  p.add_argument("--with-peer", metavar="PYTHON",
                 help="also run the peer harness with this interpreter, alternating with ours "
                      "bench by bench (e.g. /work/peer_venv/bin/python)")
  p.add_argument("--peer-script", default=PEER_SCRIPT)
  p.add_argument("--peer-out", help="the peer's JSON lines go here (with --with-peer)")
  p.add_argument("--rounds", type=int, default=1, help="alternating rounds (with --with-peer)")
  # report
  p.add_argument("--compare", metavar="PEER_JSONL", help="build the ours-vs-peer table from "
                 "this peer file and --ours (or --out); no measurement")
  p.add_argument("--ours", metavar="OURS_JSONL", help="our JSON lines for --compare")
  p.add_argument("--readme", metavar="README", help="rewrite the section between "
                 "<!-- bench:start --> and <!-- bench:end --> of this file with the table")
  # accelerator mode (benchmarks/accel.py)
  p.add_argument("--preset", choices=("1b", "7b", "tiny"),
                 help="accelerator mode: the SFT step at the TinyLlama-1.1B ('1b') or "
                      "LLaMA-2-7B ('7b') shape: MFU, compile times, memory ('tiny': the same "
                      "code on a small shape, a CPU smoke test)")
  p.add_argument("--batch", type=int, default=0, help="--preset: batch (default 8)")
  p.add_argument("--seq", type=int, default=0, help="--preset: sequence length (default 1024)")
  p.add_argument("--dtype", default="bfloat16", help="--preset: compute dtype (params f32)")
  p.add_argument("--remat", choices=("none", "full", "dots_saveable", "minimal"),
                 help="--preset: model.remat (default: none; 7b: full)")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                 help="--preset: model.scan_layers, one lax.scan over the blocks (default: "
                      "off; 7b: on)")
  p.add_argument("--attention", choices=("xla", "cudnn", "auto"), default="auto",
                 help="--preset: model.attention_impl (auto: cuDNN flash attention on an "
                      "NVIDIA GPU, XLA elsewhere)")
  p.add_argument("--aot", action="store_true",
                 help="--preset: only lower + compile the init programs and the SFT step at "
                      "full shape (no parameters allocated): compile times and XLA's memory "
                      "analysis; the default on CPU for 1b / 7b")
  p.add_argument("--ppo", action="store_true",
                 help="--preset: one PPO iteration (benchmarks/ppo_iteration.py, 16 prompts "
                      "x 64 + 64) with this model shape instead of the SFT step")
  p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                 help="--preset: override a TransformerConfig field, e.g. num_layers=2")
  return p


def _child_args(args, name: str) -> list[str]:
  out = ["--only", name, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
         "--ppo-warmup", str(args.ppo_warmup), "--ppo-iters", str(args.ppo_iters),
         "--wait-quiet", str(args.wait_quiet), "--quiet-threshold", str(args.quiet_threshold),
         "--max-retries", str(args.max_retries), "--seed", str(args.seed),
         "--threads", str(args.threads), "--peak-dtype", args.peak_dtype, "--child"]
  if args.peak_flops:
    out += ["--peak-flops", repr(args.peak_flops)]
  return out


def _emit(line: str, path: str | None):
  print(line, flush=True)
  if path:
    with open(path, "a") as fh:
      fh.write(line.rstrip("\n") + "\n")


def _run_child(cmd: list[str], out_path: str | None) -> tuple[int, list[dict]]:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  recs = []
  for line in proc.stdout.splitlines():
    line = line.strip()
    if not line.startswith("{"):
      continue
    _emit(line, out_path)
    try:
      recs.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return proc.returncode, recs


def _ours_cmd(args, name):
  return [sys.executable, "-m", "benchmarks.run", *_child_args(args, name)]


def _peer_cmd(args, name):
  cmd = [args.with_peer, args.peer_script, "--only", name, "--warmup", str(args.warmup),
         "--repeats", str(args.repeats), "--ppo-warmup", str(args.ppo_warmup),
         "--ppo-iters", str(args.ppo_iters), "--wait-quiet", str(args.wait_quiet),
         "--quiet-threshold", str(args.quiet_threshold), "--max-retries",
         str(args.max_retries), "--seed", str(args.seed)]
  if args.threads:
    cmd += ["--threads", str(args.threads)]
  return cmd


def run_inproc(args, names):
  """Runs the measurements in this process; one JSON line each."""
  from benchmarks import measure
  measure.QUIET["max_wait_s"] = args.wait_quiet
  measure.QUIET["threshold"] = args.quiet_threshold
  from benchmarks import benches  # imports JAX: after the affinity is set
  import jax

  ct = benches.CompileTimer()
  for name in names:
    if name != "matmul_peak" and not args.peak_flops:
      # Only in --inproc / single-process use: the driver measures the peak in its own process.
      rec = _call(benches, "matmul_peak", args, ct)
      args.peak_flops = rec["value"]
      _emit(json.dumps(rec), args.out)
    rec = _call(benches, name, args, ct)
    rec.update({
        "threads": measure.threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "peak_rss_mib": rec.get("peak_rss_mib", round(measure.peak_rss_mib(), 1)),
        "warmup": args.ppo_warmup if name == "ppo_iteration" else args.warmup,
        "repeats": args.ppo_iters if name == "ppo_iteration" else args.repeats,
        "versions": measure.versions(),
        "machine": measure.machine(),
    })
    _emit(json.dumps(rec), args.out)


def _call(benches, name, args, ct) -> dict:
  real_stdout = sys.stdout
  sys.stdout = sys.stderr  # anything a library prints goes to stderr; stdout = JSON only
  try:
    res = getattr(benches, f"bench_{name}")(args, ct)
  finally:
    sys.stdout = real_stdout
  rec = {"bench": name, **res}
  for k in ("times_s", "warmup_times_s"):
    if k in rec:
      rec[k] = [round(t, 4) for t in rec[k]]
  return rec


def _set_threads(n: int):
  if n and n < (os.cpu_count() or 1):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def main(argv=None):
  args = _parser().parse_args(argv)
  _set_threads(args.threads)

  if args.preset:
    from benchmarks import accel
    accel.main(args)
    return 0

  if args.compare:
    from benchmarks import report
    ours = args.ours or args.out
    if not ours:
      raise SystemExit("--compare needs --ours FILE (or --out FILE) with our JSON lines.")
    table = report.build_table(report.load(ours), report.load(args.compare))
    print(table)
    if args.readme:
      report.rewrite_readme(args.readme, table)
    return 0

  names = args.only or list(BENCHES)
  if args.child or args.inproc or (len(names) == 1 and not args.with_peer and
                     (names[0] == "matmul_peak" or args.peak_flops)):
    run_inproc(args, names)
    return 0

  # One fresh process per measurement; the matmul peak first (unless given).
  rc = 0
  if not args.peak_flops:
    code, recs = _run_child(_ours_cmd(args, "matmul_peak"), args.out)
    rc = rc or code
    if recs:
      args.peak_flops = recs[-1]["value"]
  for _ in range(max(args.rounds, 1)):
    for name in names:
      if name == "matmul_peak":
        continue
      code, _ = _run_child(_ours_cmd(args, name), args.out)
      rc = rc or code
      if args.with_peer:
        code, _ = _run_child(_peer_cmd(args, name), args.peer_out)
        rc = rc or code
  if args.readme and args.out:
    from benchmarks import report
    peer = args.peer_out if args.with_peer else SHIPPED_PEER
    table = report.build_table(report.load(args.out), report.load(peer))
    print(table, file=sys.stderr)
    report.rewrite_readme(args.readme, table)
  return rc


if __name__ == "__main__":
  sys.exit(main())
