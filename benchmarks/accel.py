"""Accelerator mode: the SFT step at real LLaMA shapes (MFU, compile times, memory).

    python -m benchmarks.run --preset 1b                 # TinyLlama-1.1B shape, bf16 compute
    python -m benchmarks.run --preset 7b                 # LLaMA-2-7B shape, remat "full"
    python -m benchmarks.run --preset 1b --remat full --scan --attention cudnn
    python -m benchmarks.run --preset 1b --aot           # compile only: no parameters allocated
    python -m benchmarks.run --preset 1b --ppo           # one PPO iteration at this shape
    python -m benchmarks.run --preset tiny               # the same code on a CPU-sized model

Three modes, one JSON line each:
* run (default on an accelerator): `init_sharded` (timed, with its compile), then the
  library's SFT step (`make_train_step(sft.sft_loss)`, AdamW, float32 parameters and
  optimizer state, `--dtype` matmuls) timed; MFU = analytic model FLOPs (`flops.py`) per
  second per chip over the chip's published dense bf16 peak (`PEAK_BF16_FLOPS`) and over a
  matmul peak measured on the device. Peak device memory from `device.memory_stats()`.
* aot (`--aot`; automatic on CPU for 1b / 7b): lowers and compiles the parameter init
  programs and the SFT step at full shape from abstract values (`jax.ShapeDtypeStruct`),
  allocating nothing, and reports compile times and XLA's memory analysis (per device).
* ppo (`--ppo`): `benchmarks/ppo_iteration.py`'s PPO iteration (16 prompts x 64 + 64, a
  separate critic and RM) with this model shape: s/iteration and first-iteration compile.
Every mode names the attention kernel the step's HLO holds (cuDNN's fused attention custom
call or XLA's) beside the one `model.attention_impl` asked for.

The mesh spans every local device (data parallel; `--batch` must divide by their number).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

# TinyLlama-1.1B (LLaMA-2 architecture, GQA 32/4) and LLaMA-2-7B (no GQA) shapes.
PRESETS = {
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               head_dim=0, mlp_dim=5632),
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               head_dim=0, mlp_dim=11008),
    "tiny": dict(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=0, mlp_dim=344),
}
DEFAULT_SHAPE = {"1b": (8, 1024), "7b": (8, 1024), "tiny": (4, 128)}
# 7B: float32 parameters + AdamW moments alone are 16 bytes x 6.7e9 = 100 GiB; only
# rematerialised activations leave room for a batch on one 141 GB chip. Scanned, because
# XLA then keeps one block's recomputed activations at a time (XLA:CPU's analysis, AOT at
# 8 x 1024: temporaries 36 GiB scanned, 191 GiB unscanned with the same remat).
DEFAULT_REMAT = {"1b": "none", "7b": "full", "tiny": "none"}
DEFAULT_SCAN = {"1b": False, "7b": True, "tiny": False}

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
GIB = 2**30


def table_peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_FLOPS:
    if key in kind:
      return peak
  return None


def _override(key: str, value: str):
  """`--model KEY=VALUE` as the TransformerConfig field's type."""
  from rlhf_jax.models import TransformerConfig
  fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
  if key not in fields:
    raise SystemExit(f"--model {key}=...: TransformerConfig has no field {key!r}.")
  kind = type(getattr(TransformerConfig(), key))
  if kind is bool:
    return value.lower() in ("1", "true", "yes")
  return kind(value)


def preset_config(args):
  """The TransformerConfig of `--preset` with the command line's model flags."""
  from benchmarks import benches
  overrides = dict(PRESETS[args.preset], param_dtype="float32", dtype=args.dtype,
                   remat=args.remat or DEFAULT_REMAT[args.preset],
                   scan_layers=DEFAULT_SCAN[args.preset] if args.scan is None else args.scan,
                   attention_impl=args.attention)
  for kv in args.model:
    k, v = kv.split("=", 1)
    overrides[k] = _override(k, v)
  return benches.model_config(**overrides)


def _model_fields(cfg) -> dict:
  return {k: getattr(cfg, k) for k in (
      "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
      "param_dtype", "dtype", "remat", "scan_layers", "attention_impl")}


def attention_in_hlo(hlo_text: str) -> str:
  """Which attention kernel a compiled program holds: cuDNN's fused attention is a custom
  call `__cudnn$fmha...`; otherwise XLA's own ops."""
  return "cudnn" if "__cudnn$fmha" in hlo_text else "xla"


def memory_fields(compiled, prefix: str = "") -> dict:
  """XLA's per-device memory analysis of a compiled program, GiB."""
  try:
    ma = compiled.memory_analysis()
  except Exception as exc:  # pylint: disable=broad-except  (not every backend has it)
    return {f"{prefix}memory_analysis_error": f"{type(exc).__name__}: {exc}"[:200]}
  out = {f"{prefix}xla_{k}_gib": round(getattr(ma, f"{k}_size_in_bytes") / GIB, 3)
         for k in ("argument", "output", "temp", "alias")}
  # What the program needs at once: arguments + outputs + temporaries, less donated buffers.
  out[f"{prefix}xla_total_gib"] = round(sum(getattr(ma, f"{k}_size_in_bytes") for k in (
      "argument", "output", "temp")) / GIB - out[f"{prefix}xla_alias_gib"], 3)
  return out


def _abstract_sft(cfg, batch: int, seq: int, mesh, seed: int):
  """(jitted step, its abstract arguments): the SFT train step of `cfg` on the mesh, from
  ShapeDtypeStructs with shardings; nothing allocated."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from benchmarks import benches
  from rlhf_jax import sharding
  from rlhf_jax.models import PolicyModel
  from rlhf_jax.stages.sft import sft_loss
  from rlhf_jax.train import optim, state as state_lib

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg, nnx.Rngs(seed))))
  params_sh = sharding.param_shardings(abstract, mesh)
  placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  params = jax.tree.map(placed, abstract, params_sh)
  tx = optim.make_optimizer(benches.SFT_OPTIM)
  shardings = state_lib.state_shardings(params_sh, tx, params, mesh)
  state = jax.eval_shape(
      lambda p: state_lib.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), params)
  state = jax.tree.map(placed, state, shardings)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("tokens", "mask", "loss_mask")}
  host = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=s)
          for k, s in batch_sh.items()}
  step = state_lib.make_train_step(graphdef, sft_loss, tx, mesh, shardings, batch_sh)
  return step.jitted, step.args(state, host)


def aot_init(cfg, mesh, seed: int) -> dict:
  """`sharded_init.init_programs` at full shape, each distinct program lowered and compiled."""
  from flax import nnx
  from rlhf_jax import sharded_init, sharding
  from rlhf_jax.models import PolicyModel

  t0 = time.perf_counter()
  _, _, calls = sharded_init.init_programs(lambda: PolicyModel(cfg, nnx.Rngs(params=seed)), mesh)
  plan_s = time.perf_counter() - t0
  unique = list({id(program): (program, args) for program, args in calls}.values())
  lower_s = compile_s = temp = 0.0
  with sharding.use_mesh(mesh):
    for program, args in unique:
      t0 = time.perf_counter()
      lowered = program.lower(*args)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      lower_s, compile_s = lower_s + t1 - t0, compile_s + time.perf_counter() - t1
      temp = max(temp, compiled.memory_analysis().temp_size_in_bytes)
  return {"init_trace_and_keys_s": round(plan_s, 3), "init_programs": len(unique),
          "init_parameters": len(calls), "init_lower_s": round(lower_s, 3),
          "init_compile_s": round(compile_s, 3), "init_max_xla_temp_gib": round(temp / GIB, 3)}


def aot_step(cfg, batch: int, seq: int, mesh, seed: int) -> dict:
  """The SFT step lowered and compiled at full shape: times, XLA memory and cost."""
  from rlhf_jax import sharding
  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    jitted, args = _abstract_sft(cfg, batch, seq, mesh, seed)
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  return {"step_trace_and_lower_s": round(t1 - t0, 3), "step_compile_s": round(t2 - t1, 3),
          **memory_fields(compiled, "step_"), "step_hlo_flops": float(cost.get("flops", 0.0)),
          "attention_kernel": attention_in_hlo(compiled.as_text())}


def aot_record(args, cfg, batch: int, seq: int) -> dict:
  import jax
  from benchmarks import benches
  mesh = benches.make_mesh()
  dev = jax.devices()[0]
  return {"bench": f"sft_step_{args.preset}_aot", "metric": "step_compile_s",
          **aot_init(cfg, mesh, args.seed), **aot_step(cfg, batch, seq, mesh, args.seed),
          "device_bytes_limit_gib": _bytes_limit_gib(dev)}


def _bytes_limit_gib(dev) -> float | None:
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (CPU has none)
    return None
  return round(stats["bytes_limit"] / GIB, 2) if "bytes_limit" in stats else None


def _peak_memory(dev) -> dict:
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return {"device_peak_bytes_in_use_gib": round(stats["peak_bytes_in_use"] / GIB, 2)
          if "peak_bytes_in_use" in stats else None, "device_bytes_limit_gib":
          round(stats["bytes_limit"] / GIB, 2) if "bytes_limit" in stats else None}


def _persistent_cache():
  """A compilation cache private to this process (unless one is set), so that the cost and
  memory analysis after the timed calls loads their programs instead of compiling them
  again, while the first calls still compile (and are timed) from scratch."""
  import atexit
  import shutil
  import tempfile
  import jax
  if not jax.config.jax_compilation_cache_dir:
    path = tempfile.mkdtemp(prefix="rlhf_jax_accel_cache_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run_record(args, cfg, batch: int, seq: int) -> dict:
  """Init and SFT step on the devices: times, compile, MFU, device and XLA memory."""
  import jax
  from benchmarks import benches, flops as flops_lib, measure
  from rlhf_jax import sharding

  _persistent_cache()
  ct = benches.CompileTimer()
  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  peak = measure.matmul_peak(sizes=(512, 1024) if on_cpu else (4096, 8192), dtype=args.dtype,
                             warmup=2, repeats=5, max_retries=args.max_retries)
  prep = benches.prepare_sft_step(args.seed, cfg=cfg, batch=batch, seq=seq, ct=ct)
  step_compile = benches._first_call(prep, ct)  # pylint: disable=protected-access
  stats = measure.time_repeats(prep.run, max(args.warmup - 1, 0), args.repeats,
                               args.max_retries)
  memory = _peak_memory(dev)  # before the analysis below can add anything
  (_, jitted, fargs), = prep.programs()
  with sharding.use_mesh(prep.mesh):
    compiled = jitted.lower(*benches._abstract(fargs)).compile()  # pylint: disable=protected-access
  med = stats["median_s"]
  achieved = flops_lib.sft_step(cfg, batch, seq) / med / jax.device_count()  # per chip
  tpeak = table_peak(dev.device_kind)
  return {
      "bench": f"sft_step_{args.preset}", "metric": "mfu",
      "value": round(achieved / (tpeak or peak["value"]), 4),
      "mfu_vs_table_peak": round(achieved / tpeak, 4) if tpeak else None,
      "table_peak_flops_per_s": tpeak,
      "mfu_vs_measured_matmul_peak": round(achieved / peak["value"], 4),
      "measured_matmul_peak_flops_per_s": peak["value"], "measured_matmul_size": peak["size"],
      "tokens_per_s": batch * seq / med, "model_flops_per_s_per_chip": achieved,
      **stats, "times_s": [round(t, 5) for t in stats["times_s"]],
      **prep.init, **{f"step_{k}": v for k, v in step_compile.items()},
      **memory, **memory_fields(compiled, "step_"),
      "attention_kernel": attention_in_hlo(compiled.as_text()), "n_params": prep.n_params,
  }


def ppo_record(args, cfg) -> dict:
  """`benches.bench_ppo_iteration` (its shapes) with this model: s/iteration, compile."""
  import jax
  from benchmarks import benches

  _persistent_cache()
  dev = jax.devices()[0]
  args.peak_flops = args.peak_flops or table_peak(dev.device_kind) or 0.0
  rec = benches.bench_ppo_iteration(args, benches.CompileTimer(), cfg)
  return {**rec, "bench": f"ppo_iteration_{args.preset}", **_peak_memory(dev),
          "mfu_note": "vs the table's bf16 peak" if table_peak(dev.device_kind) else None}


def _requested_kernel(cfg, seq: int) -> str:
  from rlhf_jax.models import layers
  try:
    return layers.attention_kernel(cfg.attention_impl, cfg.jnp_dtype, cfg.resolved_head_dim,
                                   seq)
  except ValueError as exc:
    return f"error: {exc}"


def main(args):
  from benchmarks import measure
  measure.QUIET["max_wait_s"] = args.wait_quiet
  measure.QUIET["threshold"] = args.quiet_threshold
  import jax
  from benchmarks import flops as flops_lib

  cfg = preset_config(args)
  batch, seq = DEFAULT_SHAPE[args.preset]
  batch, seq = args.batch or batch, args.seq or seq
  on_cpu = jax.default_backend() == "cpu"
  mode = ("ppo" if args.ppo else
          "aot" if args.aot or (on_cpu and args.preset != "tiny") else "run")
  real_stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the JSON line only
  t0 = time.perf_counter()
  try:
    if mode == "aot":
      rec = aot_record(args, cfg, batch, seq)
    elif mode == "ppo":
      rec = ppo_record(args, cfg)
    else:
      rec = run_record(args, cfg, batch, seq)
  finally:
    sys.stdout = real_stdout
  dev = jax.devices()[0]
  rec.update({
      "mode": mode, "wall_s": round(time.perf_counter() - t0, 2),
      "attention_impl": cfg.attention_impl,
      "attention_kernel_chosen": _requested_kernel(cfg, seq),
      "model_flops": flops_lib.sft_step(cfg, batch, seq) if mode != "ppo" else
      rec.get("model_flops"),
      "shape": {"batch": batch, "seq": seq} if mode != "ppo" else rec.get("shape"),
      "model": _model_fields(cfg), "n_params_analytic": flops_lib.param_count(cfg),
      "backend": jax.default_backend(), "device": dev.device_kind,
      "num_devices": jax.device_count(), "versions": measure.versions(),
      "machine": measure.machine(),
  })
  line = json.dumps(rec)
  print(line, flush=True)
  if args.out:
    with open(args.out, "a") as fh:
      fh.write(line + "\n")


def _fmt(x, unit: str = "", digits: int = 2) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def summary(records: list[dict], preset: str = "1b") -> str:
  """The figures of benchmarks/accel.sh's JSON lines, one per line (missing ones: n/a)."""
  def last(mode, bench="sft_step", remat=None):
    found = [r for r in records if r.get("mode") == mode and
             r.get("bench", "").startswith(f"{bench}_{preset}") and
             (remat is None or r["model"]["remat"] == remat)]
    return found[-1] if found else {}

  run, ppo = last("run"), last("ppo", "ppo_iteration")
  aot = {m: last("aot", remat=m) for m in ("none", "full")}
  pipe = ([r for r in records if r.get("bench") == "default_pipeline"] or [{}])[-1]
  return "\n".join([
      f"SFT step {preset} MFU vs table peak: {_fmt(run.get('mfu_vs_table_peak'), '', 4)} "
      f"(median {_fmt(run.get('median_s'), ' s', 4)}, {_fmt(run.get('tokens_per_s'), '', 0)} "
      f"tokens/s, attention {run.get('attention_kernel', 'n/a')}, {run.get('device', '')})",
      f"init ({preset}): {_fmt(run.get('init_s'), ' s')} wall, compile "
      f"{_fmt(run.get('init_compile_s'), ' s')}",
      f"SFT step compile ({preset}): {_fmt(run.get('step_compile_s'), ' s')}",
      f"peak device memory ({preset} SFT): "
      f"{_fmt(run.get('device_peak_bytes_in_use_gib'), ' GiB')}",
      *(f"XLA temporaries, {preset} SFT step, remat {m}: "
        f"{_fmt(aot[m].get('step_xla_temp_gib'), ' GiB')} (compile "
        f"{_fmt(aot[m].get('step_compile_s'), ' s')})" for m in ("none", "full")),
      f"PPO iteration ({preset} shape): {_fmt(ppo.get('median_s'), ' s')}, first-iteration "
      f"compile {_fmt(ppo.get('compile_s'), ' s')}",
      f"default pipeline (configs/ppo.py) wall: {_fmt(pipe.get('value'), ' s', 1)}"
      + ("" if pipe.get("rc", 0) == 0 else f" (FAILED, rc {pipe['rc']})"),
  ])


if __name__ == "__main__":  # python -m benchmarks.accel RESULTS.jsonl [PRESET]: the summary
  with open(sys.argv[1]) as fh:
    print(summary([json.loads(line) for line in fh if line.startswith("{")],
                  *sys.argv[2:3]))
