"""Ours-vs-peer markdown table from two JSON-lines files, and the README section rewrite.

Several lines of one bench on a side (alternating rounds) are combined by the median of
their values; when both sides have the same number of lines for a bench, the per-round
ratios (round i of ours against round i of the peer) are listed too.
"""

from __future__ import annotations

import json
import os
import statistics

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# bench -> (label, unit, higher_is_better, target speed-up over the peer)
BENCH_INFO = {
    "generate": ("generate (16x64 prompts, 64 new tokens)", "new tok/s", True, 3.0),
    "sft_step": ("sft_step (16x128, AdamW)", "tok/s", True, 1.0),
    "rm_step": ("rm_step (8 pairs x 128, AdamW)", "pairs/s", True, 1.5),
    "ppo_iteration": ("ppo_iteration (16x64 + 64, 4 epochs)", "s/iter", False, 3.0),
}


def load(path: str) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  with open(path) as fh:
    for line in fh:
      line = line.strip()
      if line.startswith("{"):
        rec = json.loads(line)
        out.setdefault(rec.get("bench", "?"), []).append(rec)
  return out


def _fmt(x: float) -> str:
  if x >= 100:
    return f"{x:,.0f}"
  if x >= 10:
    return f"{x:.1f}"
  return f"{x:.3g}" if x >= 1 else f"{x:.3f}"


def _speedup(ours: float, peer: float, higher_better: bool) -> float:
  return ours / peer if higher_better else peer / ours


def build_table(ours: dict[str, list[dict]], peer: dict[str, list[dict]]) -> str:
  rows = ["| bench | ours | peer (PyTorch + TRL) | speed-up (ours vs peer) | target | met? "
          "| ours peak RSS | peer peak RSS | ours MFU |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  notes = []
  for bench, (label, unit, higher, target) in BENCH_INFO.items():
    o, p = ours.get(bench, []), peer.get(bench, [])
    if not o or not p:
      def med(recs):
        return "—" if not recs else _fmt(statistics.median(r["value"] for r in recs))
      rows.append(f"| {label} | {med(o)} | {med(p)} | — | ≥ {target:g}× | — | — | — | — |")
      continue
    ov = statistics.median(r["value"] for r in o)
    pv = statistics.median(r["value"] for r in p)
    sp = _speedup(ov, pv, higher)
    paired = ""
    if len(o) == len(p) > 1:
      rs = [_speedup(a["value"], b["value"], higher) for a, b in zip(o, p)]
      paired = " (rounds: " + ", ".join(f"{r:.2f}" for r in rs) + ")"
    o_rss = statistics.median(r.get("peak_rss_mib", float("nan")) for r in o)
    p_rss = statistics.median(r.get("peak_rss_mib", float("nan")) for r in p)
    mfu = [r["mfu"] for r in o if "mfu" in r]
    contended = any(r.get("cpu", {}).get("contended") for r in o + p)
    extra = ""
    if bench == "ppo_iteration":
      o_roll = statistics.median(r.get("rollout_generate_median_s", float("nan")) for r in o)
      p_roll = statistics.median(r.get("rollout_generate_median_s", float("nan")) for r in p)
      extra = f"<br>rollout {_fmt(o_roll)} s vs {_fmt(p_roll)} s"
    met = "yes" if sp >= target else "no"
    if contended:  # too few clean attempts on at least one side: the ratio is not evidence
      met += "?¹"
    mfu_s = f"{100 * statistics.median(mfu):.1f}%" if mfu else "—"
    rows.append(f"| {label} | {_fmt(ov)} {unit} | {_fmt(pv)} {unit} | **{sp:.2f}×**{paired}"
                f"{extra} | ≥ {target:g}× | {met} | {o_rss:.0f} MiB | {p_rss:.0f} MiB | "
                f"{mfu_s} |")
    if contended and not any("¹" in n for n in notes):
      notes.append("¹ contended: other processes used >= 10% of the CPU during too many "
                   "attempts (`cpu.contended`); rerun on a quiet machine before trusting it.")
    if bench == "ppo_iteration":
      ok = o_rss <= p_rss
      notes.append(f"PPO peak RSS: ours {o_rss:.0f} MiB vs peer {p_rss:.0f} MiB — target "
                   f"≤ peer: {'met' if ok else 'not met'}.")
  o_any = next((r for b in BENCH_INFO for r in ours.get(b, [])), {})
  p_any = next((r for b in BENCH_INFO for r in peer.get(b, [])), {})
  m = o_any.get("machine", {})
  ov_ = o_any.get("versions", {})
  pv_ = p_any.get("versions", {})
  peak = o_any.get("peak_flops_per_s")
  head = [
      f"Measured {m.get('date', '?')} on {m.get('cpu', '?')}"
      f"{', ' + m['uarch'] if m.get('uarch') else ''} "
      f"({m.get('cores', '?')} cores, {', '.join(m.get('isa', []))}, {m.get('mem_gib', '?')} GiB), "
      f"{o_any.get('threads', '?')} threads, float32, same shapes on both sides; "
      f"medians, speed-up = ours/peer throughput (peer/ours seconds for PPO).",
      f"Ours: jax {ov_.get('jax', '?')}, flax {ov_.get('flax', '?')}, optax "
      f"{ov_.get('optax', '?')}. Peer: torch {pv_.get('torch', '?')}, transformers "
      f"{pv_.get('transformers', '?')}, trl {pv_.get('trl', '?')}."
      + (f" MFU = analytic model FLOPs / s over a measured float32 matmul peak of "
         f"{peak / 1e9:.0f} GFLOP/s." if peak else ""),
      "",
  ]
  return "\n".join(head + rows) + "\n" + "".join("\n" + n + "\n" for n in notes)


def rewrite_readme(path: str, table: str):
  with open(path) as fh:
    text = fh.read()
  if START not in text or END not in text:
    raise SystemExit(f"{path}: no {START} ... {END} markers to rewrite.")
  a = text.index(START) + len(START)
  b = text.index(END)
  text = text[:a] + "\n" + table + text[b:]
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(text)
  os.replace(tmp, path)
