"""The four measurements, on the library code users run (no benchmark-only model code).

  generate       `sampling.make_sampler` on a `PolicyModel`: 16 prompts x 64, 64 new tokens
                 (temperature 1, no top-k/top-p, EOS banned for all 64 steps), KV cache
  sft_step       `train.state.make_train_step` with `sft.sft_loss`, 16 x 128, loss on every
                 position, AdamW
  rm_step        the same train step with `rm.rm_loss` on a `RewardModel`: 8 pairs x 128,
                 chosen and rejected in one 16 x 128 forward (`rm.pair_scores`)
  ppo_iteration  `ppo.Iteration` (the body of `ppo.run`'s loop: sampler, RM score, experience,
                 `ppo_fn.loss` on `ActorCritic`) with a separate critic, a separate
                 reward model and the frozen reference, built from random networks by
                 `benchmarks/ppo_iteration.py`

Shapes, dtype, optimizer settings and the measurement rules are those of the peer harness
(`../shared/bench/peer_hf.py`). Every function returns the fields of one JSON line.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from benchmarks import flops as flops_lib
from benchmarks import measure
from benchmarks.measure import CpuMeter, wait_quiet

# ---------------------------------------------------------------------------------------------
# The shared configuration (identical to the peer's MODEL_CFG and shapes)
# ---------------------------------------------------------------------------------------------
MODEL = dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
             head_dim=0, mlp_dim=688, rope_theta=10_000.0, rms_norm_eps=1e-6,
             tie_embeddings=False, init_std=0.02, param_dtype="float32", dtype="float32")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_NORMAL_ID = 4  # random tokens from [4, vocab): never pad / EOS

GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 64, 64
SFT_BATCH, SFT_SEQ = 16, 128
RM_PAIRS, RM_SEQ = 8, 128
PPO_BATCH, PPO_PROMPT, PPO_RESPONSE, PPO_EPOCHS, PPO_MINI_BATCHES = 16, 64, 64, 4, 1

BENCHES = ("generate", "sft_step", "rm_step", "ppo_iteration")

# AdamW as the peer runs it (torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8,
# weight decay 0.01; TRL's PPO: weight decay 0, linear decay of lr 3e-6), no clipping.
OPTIM = dict(warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0, grad_accum_steps=1)
SFT_OPTIM = dict(OPTIM, learning_rate=1e-4, schedule="constant", weight_decay=0.01)
RM_OPTIM = dict(OPTIM, learning_rate=1e-5, schedule="constant", weight_decay=0.01)
PPO_OPTIM = dict(OPTIM, learning_rate=3e-6, schedule="linear", decay_steps=10_000,
                 end_lr_ratio=0.0, weight_decay=0.0)


def model_config(**overrides):
  from rlhf_jax.models import TransformerConfig
  return TransformerConfig(**{**MODEL, **overrides})


def make_mesh():
  from rlhf_jax import config as config_lib, sharding
  return sharding.make_mesh(config_lib.sft_config().mesh)  # every local device, data-parallel


def random_tokens(rng: np.random.Generator, shape) -> np.ndarray:
  return rng.integers(FIRST_NORMAL_ID, MODEL["vocab_size"], shape, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Compile-time and cost bookkeeping
# ---------------------------------------------------------------------------------------------
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


class CompileTimer:
  """Sums JAX's own compile-phase duration events (tracing, lowering, XLA compilation).
  `compile_s` = their sum, i.e. the part of the first calls that is not execution."""

  def __init__(self):
    self.totals = {v: 0.0 for v in _COMPILE_EVENTS.values()}
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event, duration, **kwargs):
    if event in _COMPILE_EVENTS:
      self.totals[_COMPILE_EVENTS[event]] += duration
      if event.endswith("backend_compile_duration"):
        self.count += 1

  def snapshot(self) -> dict:
    out = {k: round(v, 3) for k, v in self.totals.items()}
    out["compile_s"] = round(sum(self.totals.values()), 3)
    out["backend_compiles"] = self.count
    return out

  def since(self, before: dict) -> dict:
    now = self.snapshot()
    return {k: round(now[k] - before.get(k, 0), 3) for k in now}


def hlo_cost(jitted, *args) -> dict:
  """XLA's cost analysis of the compiled program for these arguments (flops, bytes accessed).
  NB: XLA counts a while loop's body once, not once per trip (see `generate`)."""
  try:
    compiled = jitted.lower(*args).compile()
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else {}
    out = {"hlo_flops": float(ca.get("flops", 0.0)),
           "hlo_bytes_accessed": float(ca.get("bytes accessed", 0.0)),
           "hlo_transcendentals": float(ca.get("transcendentals", 0.0))}
    try:
      ma = compiled.memory_analysis()
      out["hlo_temp_mib"] = ma.temp_size_in_bytes / 2**20
      out["hlo_argument_mib"] = ma.argument_size_in_bytes / 2**20
      out["hlo_output_mib"] = ma.output_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
      pass
    return out
  except Exception as exc:  # cost analysis is best effort; never fail a measurement on it
    return {"hlo_cost_error": f"{type(exc).__name__}: {exc}"[:300]}


def _peak_rss() -> float:
  return round(measure.peak_rss_mib(), 1)


def _block(tree):
  return jax.block_until_ready(tree)


def _mfu_fields(model_flops: float, median_s: float, peak_flops: float | None) -> dict:
  out = {"model_flops": model_flops, "model_flops_per_s": model_flops / median_s}
  if peak_flops:
    out["peak_flops_per_s"] = peak_flops
    out["mfu"] = round(model_flops / median_s / peak_flops, 4)
  return out


# ---------------------------------------------------------------------------------------------
# a. generate
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """One measurement, set up: `run()` does one timed unit (and blocks on its outputs);
  `programs()` gives (name, jitted function, example arguments) for cost analysis and HLO."""
  run: Callable[[], Any]
  programs: Callable[[], list]
  cfg: Any
  n_params: int
  mesh: Any = None
  init: dict = dataclasses.field(default_factory=dict)  # init_sharded's time and compile


def prepare_generate(seed: int = 0, cfg=None) -> Prepared:
  from rlhf_jax import sharding
  from rlhf_jax.models import PolicyModel
  from rlhf_jax.sampling import SamplingConfig, make_sampler

  cfg = cfg or model_config()
  mesh = make_mesh()
  graphdef, params = sharding.init_sharded(lambda: PolicyModel(cfg, nnx.Rngs(params=seed)), mesh)
  sampling = SamplingConfig(max_new_tokens=GEN_NEW, temperature=1.0, top_k=0, top_p=1.0,
                            min_new_tokens=GEN_NEW)  # = the peer's min_new_tokens=max_new_tokens
  sampler = make_sampler(graphdef, sampling, eos_id=EOS_ID, pad_id=PAD_ID)
  rng = np.random.default_rng(seed)
  prompts = random_tokens(rng, (GEN_BATCH, GEN_PROMPT))
  b = sharding.shard_batch({"tokens": prompts, "mask": np.ones_like(prompts)}, mesh)
  keys = (jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(10**9))

  def run():
    with sharding.use_mesh(mesh):
      out = sampler(params, b["tokens"], b["mask"], next(keys))
    out = _block(out)
    assert out["tokens"].shape == (GEN_BATCH, GEN_NEW), out["tokens"].shape

  return Prepared(run, lambda: [("sampler", sampler, (params, b["tokens"], b["mask"],
                                                      jax.random.PRNGKey(0)))],
                  cfg, _n_params(params), mesh)


def _n_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def _first_call(prep: Prepared, ct: CompileTimer) -> dict:
  before = ct.snapshot()
  t0 = time.perf_counter()
  prep.run()
  return {"first_call_s": round(time.perf_counter() - t0, 3), **ct.since(before)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def _cost(prep: Prepared) -> dict:
  """XLA cost analysis summed over the measurement's programs."""
  from rlhf_jax import sharding
  out: dict = {}
  with sharding.use_mesh(prep.mesh):
    for _, fn, fargs in prep.programs():
      for k, v in hlo_cost(fn, *_abstract(fargs)).items():
        out[k] = out.get(k, 0.0) + v if isinstance(v, float) else v
  return out


def bench_generate(args, ct: CompileTimer) -> dict:
  prep = prepare_generate(args.seed)
  compile_info = _first_call(prep, ct)
  stats = measure.time_repeats(prep.run, max(args.warmup - 1, 0), args.repeats, args.max_retries)
  med = stats["median_s"]
  model_flops = flops_lib.generate(prep.cfg, GEN_BATCH, GEN_PROMPT, GEN_NEW)
  rss = _peak_rss()  # before the cost analysis below can add anything
  return {
      "peak_rss_mib": rss,
      "metric": "new_tokens_per_s",
      "value": GEN_BATCH * GEN_NEW / med,
      **stats,
      **compile_info,
      **_mfu_fields(model_flops, med, args.peak_flops),
      **_cost(prep),
      "hlo_note": "XLA cost analysis counts the decode loop body once, not 64 times",
      "shape": {"batch": GEN_BATCH, "prompt_len": GEN_PROMPT, "new_tokens": GEN_NEW},
      "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": GEN_NEW,
                   "kv_cache": "rlhf_jax KVCache (preallocated, prompt + new)"},
      "code": "rlhf_jax.sampling.make_sampler",
      "n_params": prep.n_params,
  }


# ---------------------------------------------------------------------------------------------
# b./c. sft_step, rm_step: the shared jitted train step
# ---------------------------------------------------------------------------------------------
def timed_init(create, mesh, ct: CompileTimer | None = None):
  """(graphdef, params, {init_s, init_compile_s, ...}): `sharding.init_sharded`, timed to
  the parameters' arrival, with its compile events when a CompileTimer is given."""
  from rlhf_jax import sharding
  before = ct.snapshot() if ct else None
  t0 = time.perf_counter()
  graphdef, params = sharding.init_sharded(create, mesh)
  _block(params)
  info = {"init_s": round(time.perf_counter() - t0, 3)}
  if ct:
    info.update({f"init_{k}": v for k, v in ct.since(before).items()})
  return graphdef, params, info


def prepare_train_step(model_cls, loss_fn, optim_cfg, host_batch, seed: int = 0,
                       cfg=None, ct: CompileTimer | None = None) -> Prepared:
  """The library's train step (`make_train_step`, sharded on the mesh, state donated)."""
  from rlhf_jax import sharding
  from rlhf_jax.train import optim, state as state_lib

  cfg = cfg or model_config()
  mesh = make_mesh()
  graphdef, params, init = timed_init(lambda: model_cls(cfg, nnx.Rngs(params=seed)), mesh, ct)
  n_params = _n_params(params)
  tx = optim.make_optimizer(optim_cfg)
  state, shardings = state_lib.create_train_state(params, tx, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in host_batch.items()}
  step = state_lib.make_train_step(graphdef, loss_fn, tx, mesh, shardings, batch_sh)
  batch = sharding.shard_batch(host_batch, mesh)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    _block((holder["state"], metrics))

  return Prepared(run, lambda: [("train_step", step.jitted, step.args(holder["state"], batch))],
                  cfg, n_params, mesh, init)


def _train_step_bench(args, ct, prep: Prepared, optim_cfg):
  compile_info = _first_call(prep, ct)
  stats = measure.time_repeats(prep.run, max(args.warmup - 1, 0), args.repeats, args.max_retries)
  rss = _peak_rss()  # before the cost analysis can add anything
  return stats, {"peak_rss_mib": rss, **compile_info, **_cost(prep),
                 "n_params": prep.n_params, "dtype": prep.cfg.dtype,
                 "optimizer": "optax adamw via rlhf_jax.train.optim.make_optimizer "
                              f"(lr {optim_cfg['learning_rate']}, wd {optim_cfg['weight_decay']},"
                              " no clipping)"}


def prepare_sft_step(seed: int = 0, cfg=None, batch: int = SFT_BATCH,
                     seq: int = SFT_SEQ, ct: CompileTimer | None = None) -> Prepared:
  from rlhf_jax.models import PolicyModel
  from rlhf_jax.stages.sft import sft_loss

  cfg = cfg or model_config()
  rng = np.random.default_rng(seed)
  x = rng.integers(FIRST_NORMAL_ID, cfg.vocab_size, (batch, seq), dtype=np.int32)
  ones = np.ones_like(x)
  # loss_mask all ones = loss on every position (the peer's labels=input_ids): seq-1 targets/row
  host = {"tokens": x, "mask": ones, "loss_mask": ones}
  return prepare_train_step(PolicyModel, sft_loss, SFT_OPTIM, host, seed, cfg, ct)


def prepare_rm_step(seed: int = 0) -> Prepared:
  from rlhf_jax.models import RewardModel
  from rlhf_jax.stages.rm import rm_loss

  rng = np.random.default_rng(seed)
  chosen = random_tokens(rng, (RM_PAIRS, RM_SEQ))
  rejected = random_tokens(rng, (RM_PAIRS, RM_SEQ))
  host = {"chosen_tokens": chosen, "chosen_mask": np.ones_like(chosen),
          "rejected_tokens": rejected, "rejected_mask": np.ones_like(rejected),
          "margin": np.zeros((RM_PAIRS,), np.float32)}
  loss_fn = functools.partial(rm_loss, centering_coef=0.0)
  return prepare_train_step(RewardModel, loss_fn, RM_OPTIM, host, seed)


def _train_step_result(args, ct, prep: Prepared, optim_cfg, metric: str, units: int,
                       model_flops: float, shape: dict, code: str) -> dict:
  stats, extra = _train_step_bench(args, ct, prep, optim_cfg)
  med = stats["median_s"]
  return {"metric": metric, "value": units / med, **stats, **extra,
          **_mfu_fields(model_flops, med, args.peak_flops), "shape": shape, "code": code}


def bench_sft_step(args, ct: CompileTimer) -> dict:
  prep = prepare_sft_step(args.seed)
  return _train_step_result(args, ct, prep, SFT_OPTIM, "tokens_per_s", SFT_BATCH * SFT_SEQ,
                            flops_lib.sft_step(prep.cfg, SFT_BATCH, SFT_SEQ),
                            {"batch": SFT_BATCH, "seq": SFT_SEQ},
                            "rlhf_jax.train.state.make_train_step(sft.sft_loss)")


def bench_rm_step(args, ct: CompileTimer) -> dict:
  prep = prepare_rm_step(args.seed)
  return _train_step_result(args, ct, prep, RM_OPTIM, "pairs_per_s", RM_PAIRS,
                            flops_lib.rm_step(prep.cfg, 2 * RM_PAIRS, RM_SEQ),
                            {"pairs": RM_PAIRS, "seq": RM_SEQ},
                            "rlhf_jax.train.state.make_train_step(rm.rm_loss)")


# ---------------------------------------------------------------------------------------------
# d. ppo_iteration
# ---------------------------------------------------------------------------------------------
class PreparedPPO:
  """PPO set up: `run()` does one iteration on the next batch of random prompts."""

  def __init__(self, seed: int = 0, iters: int = 100, cfg=None):
    from benchmarks import ppo_iteration as ppo_it

    self.cfg = cfg or model_config()
    self.config = ppo_it.bench_config(PPO_BATCH, PPO_PROMPT, PPO_RESPONSE, PPO_EPOCHS,
                                      PPO_MINI_BATCHES, PPO_OPTIM, seed=seed)
    self.mesh = make_mesh()
    setup = ppo_it.build(self.config, self.cfg, self.mesh, eos_id=EOS_ID, pad_id=PAD_ID)
    self.n_params = _n_params(setup.state.params)
    self.iterate = ppo_it.BenchIteration(self.config, setup)
    rng = np.random.default_rng(seed)
    self.prompts = rng.integers(FIRST_NORMAL_ID, self.cfg.vocab_size,
                                (iters, PPO_BATCH, PPO_PROMPT), dtype=np.int32)
    self.state = setup.state
    del setup
    self.it = 0
    self.metrics, self.phases = {}, {}

  def run(self):
    tokens = self.prompts[self.it % len(self.prompts)]
    self.it += 1
    self.state, self.metrics, self.phases = self.iterate(
        self.state, {"tokens": tokens, "mask": np.ones_like(tokens)}, self.it)
    return self.phases

  def programs(self):
    return self.iterate.programs()


def bench_ppo_iteration(args, ct: CompileTimer, cfg=None) -> dict:
  """`cfg`: another model shape (`--preset` runs it at the accelerator shapes)."""
  iters = args.ppo_warmup + args.ppo_iters + args.max_retries
  prep = PreparedPPO(args.seed, iters, cfg)
  cfg = prep.cfg

  att = measure.Attempts(args.ppo_iters, args.max_retries)
  warm_times, first_phases = [], {}
  compile_info = {}
  it = 0
  while it < iters:
    it += 1
    warming = it <= args.ppo_warmup
    if not warming:
      if att.done:
        it -= 1
        break
      att.waited += wait_quiet()
    before = ct.snapshot()
    with CpuMeter() as m:
      phases = prep.run()
    if it == 1:
      compile_info = ct.since(before)
      first_phases = phases
    if warming:
      warm_times.append(m.wall)
    else:
      att.record(m, phases)
  stats = att.summary()
  sel = att.selected_extra()
  med = stats["median_s"]
  rollout = statistics.median([p["rollout_s"] for p in sel])
  exp_s = statistics.median([p["experience_s"] for p in sel])
  upd_s = statistics.median([p["update_s"] for p in sel])
  rest = statistics.median([t - p["rollout_s"] for t, p in
                            zip(stats["times_s"], sel)])
  model_flops = flops_lib.ppo_iteration(cfg, PPO_BATCH, PPO_PROMPT, PPO_RESPONSE,
                                        PPO_EPOCHS * PPO_MINI_BATCHES)
  rss = _peak_rss()  # before the cost analysis below can add anything
  out = {
      "peak_rss_mib": rss,
      "metric": "s_per_iteration",
      "value": med,
      **stats,
      "warmup_times_s": warm_times,
      "rollout_generate_median_s": rollout,
      "rest_median_s": rest,
      "experience_median_s": exp_s,
      "update_median_s": upd_s,
      "episodes_per_s": PPO_BATCH / med,
      "iterations_run": it,
      "first_iteration_phases_s": {k: round(v, 3) for k, v in first_phases.items()},
      **compile_info,
      **_mfu_fields(model_flops["total"], med, args.peak_flops),
      "model_flops_by_phase": model_flops,
      **_cost(prep),
      "hlo_note": "sum over sampler (decode loop body counted once), experience, and ONE "
                  "train step (an iteration runs 4)",
      "compiled_programs": prep.iterate.compiled(),
      "last_metrics": {k: prep.metrics[k] for k in (
          "objective/kl", "objective/scores", "loss/policy", "loss/value",
          "policy/first_minibatch_ratio", "policy/sample_logprob_gap") if k in prep.metrics},
      "shape": {"batch": PPO_BATCH, "prompt_len": PPO_PROMPT, "response_length": PPO_RESPONSE,
                "num_ppo_epochs": PPO_EPOCHS, "num_mini_batches": PPO_MINI_BATCHES,
                "optimizer_steps_per_iteration": PPO_EPOCHS * PPO_MINI_BATCHES},
      "models": "ActorCritic(policy, separate critic ValueModel) + frozen ref PolicyModel + "
                "separate RewardModel",
      "code": "rlhf_jax.stages.ppo.Iteration (make_sampler, RM score, rl.ppo_fn.experience, "
              "rl.ppo_fn.loss on ActorCritic, make_train_step), set up by "
              "benchmarks/ppo_iteration.py",
      "dtype": cfg.dtype,
      "n_params_trained": prep.n_params,
  }
  return out


# ---------------------------------------------------------------------------------------------
# machine peak (the MFU denominator)
# ---------------------------------------------------------------------------------------------
def bench_matmul_peak(args, ct: CompileTimer) -> dict:
  res = measure.matmul_peak(dtype=args.peak_dtype, warmup=2, repeats=max(args.repeats // 2, 3),
                            max_retries=args.max_retries)
  return {"metric": "flops_per_s", **res, "dtype": args.peak_dtype,
          "what": "jitted square matmul on the default device, best size"}
