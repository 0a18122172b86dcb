"""Accelerator mode: MFU of the SFT train step at a ~1B LLaMA shape.

    python -m benchmarks.run --preset 1b                 # TinyLlama-1.1B shape, bf16 compute
    python -m benchmarks.run --preset 1b --batch 16 --seq 2048 --dtype bfloat16
    python -m benchmarks.run --preset tiny               # the same code on a CPU-sized model

The mesh spans every local device (data parallel; `--batch` must divide by their number) and
MFU is per chip. The step is the library's (`make_train_step(sft.sft_loss)`, AdamW, float32
parameters and optimizer state, `--dtype` matmuls). MFU = analytic model FLOPs
(`benchmarks/flops.py`) per second over (a) the device's published dense bf16 peak from
`PEAK_BF16_FLOPS` when the device is known, and (b) a matmul peak measured on the device in
`--dtype`.
"""

from __future__ import annotations

import json
import sys

# ~1.1B parameters: the TinyLlama-1.1B shape (LLaMA-2 architecture, GQA 32/4).
PRESETS = {
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               head_dim=0, mlp_dim=5632),
    "tiny": dict(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=0, mlp_dim=344),
}
DEFAULT_SHAPE = {"1b": (8, 1024), "tiny": (4, 128)}

# Dense (no sparsity) bf16 peak FLOP/s per chip, from the vendors' data sheets.
# Matched against `jax.devices()[0].device_kind` (lower case), first match wins.
PEAK_BF16_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def table_peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_FLOPS:
    if key in kind:
      return peak
  return None


def main(args):
  from benchmarks import measure
  measure.QUIET["max_wait_s"] = args.wait_quiet
  measure.QUIET["threshold"] = args.quiet_threshold
  import jax

  from benchmarks import benches, flops as flops_lib

  overrides = dict(PRESETS[args.preset])
  for kv in args.model:
    k, v = kv.split("=", 1)
    overrides[k] = type(benches.MODEL.get(k, overrides.get(k, "")))(v) if (
        k in benches.MODEL or k in overrides) else v
  cfg = benches.model_config(**overrides, param_dtype="float32", dtype=args.dtype)
  batch, seq = DEFAULT_SHAPE[args.preset]
  batch, seq = args.batch or batch, args.seq or seq

  ct = benches.CompileTimer()
  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  real_stdout, sys.stdout = sys.stdout, sys.stderr
  try:
    peak = measure.matmul_peak(sizes=(512, 1024) if on_cpu else (4096, 8192), dtype=args.dtype,
                               warmup=2, repeats=5, max_retries=args.max_retries)
    prep = benches.prepare_sft_step(args.seed, cfg=cfg, batch=batch, seq=seq)
    stats, extra = benches._train_step_bench(args, ct, prep, benches.SFT_OPTIM)
  finally:
    sys.stdout = real_stdout
  med = stats["median_s"]
  model_flops = flops_lib.sft_step(cfg, batch, seq)
  # The mesh spans every local device (data parallel): FLOP/s per chip against a chip's peak.
  n_dev = jax.device_count()
  achieved = model_flops / med / n_dev
  tpeak = table_peak(dev.device_kind)
  mem = {}
  try:
    ms = dev.memory_stats() or {}
    mem = {"device_peak_bytes_in_use_gib": round(ms.get("peak_bytes_in_use", 0) / 2**30, 2)}
  except Exception:  # CPU has no memory stats
    pass
  rec = {
      "bench": f"sft_step_{args.preset}",
      "metric": "mfu",
      "value": round(achieved / (tpeak or peak["value"]), 4),
      "mfu_vs_table_peak": round(achieved / tpeak, 4) if tpeak else None,
      "table_peak_flops_per_s": tpeak,
      "mfu_vs_measured_matmul_peak": round(achieved / peak["value"], 4),
      "measured_matmul_peak_flops_per_s": peak["value"],
      "measured_matmul_size": peak["size"],
      "tokens_per_s": batch * seq / med,
      "model_flops": model_flops,
      "model_flops_per_s_per_chip": achieved,
      **stats,
      **extra,
      **mem,
      "shape": {"batch": batch, "seq": seq},
      "model": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "num_layers", "num_heads",
                                             "num_kv_heads", "mlp_dim", "param_dtype", "dtype")},
      "n_params_analytic": flops_lib.param_count(cfg),
      "backend": jax.default_backend(),
      "device": dev.device_kind,
      "num_devices": jax.device_count(),
      "versions": measure.versions(),
      "machine": measure.machine(),
  }
  for k in ("times_s",):
    rec[k] = [round(t, 5) for t in rec[k]]
  line = json.dumps(rec)
  print(line, flush=True)
  if args.out:
    with open(args.out, "a") as fh:
      fh.write(line + "\n")
