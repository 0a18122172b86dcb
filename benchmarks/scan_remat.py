"""Scanned layers and rematerialisation: compile time, XLA's memory figure against the
estimate, and generation speed, on whatever backend runs it (AOT compiles: no real memory).

    python -m benchmarks.scan_remat                         # 8 and 22 layers, d_model 256
    python -m benchmarks.scan_remat --layers 22 --d_model 512 --seq 512 --batch 4

One JSON line per (layers, scan_layers, remat): `compile_s` (lower + XLA compile of the SFT
loss's forward + backward), `xla_temp_mib` (`memory_analysis().temp_size_in_bytes`: the
activations and intermediates; the gradients are the program's output, `grads_mib`) and
`estimate_mib` (`activation_memory.Activations.train`, what `memory.py` adds for the train
step); then with `--generate`, per scan_layers, the sampler's seconds per call.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import config as config_lib, memory, sampling
from rlhf_jax.activation_memory import Activations
from rlhf_jax.models import PolicyModel
from rlhf_jax.models.config import REMAT_CHOICES
from rlhf_jax.stages import sft

MIB = 2 ** 20


def model_config(args, layers: int, scan: bool, remat: str):
  cfg = config_lib.get_config("sft")
  cfg.tokenizer.vocab_size = args.vocab
  cfg.model.update(d_model=args.d_model, num_layers=layers, num_heads=args.heads,
                   num_kv_heads=args.kv_heads, mlp_dim=args.d_model * 11 // 4 // 8 * 8,
                   scan_layers=scan, remat=remat)
  cfg.data.update(max_prompt_len=args.seq // 2, max_completion_len=args.seq // 2)
  return memory._model_config(cfg)[0]  # pylint: disable=protected-access


def train_step_memory(args, layers: int, scan: bool, remat: str) -> dict:
  cfg = model_config(args, layers, scan, remat)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg, nnx.Rngs(0))))
  batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
           for k in ("tokens", "mask", "loss_mask")}
  grads = jax.jit(lambda p, b: jax.grad(lambda p: sft.sft_loss(nnx.merge(graphdef, p), b)[0])(p))
  start = time.perf_counter()
  stats = grads.lower(params, batch).compile().memory_analysis()
  compile_s = time.perf_counter() - start
  act = Activations(cfg, dict(data=1, fsdp=1, tensor=1, expert=1))
  estimate = act.train(args.batch, args.seq, min(args.seq - 1, cfg.ce_chunk_len or args.seq))
  return {"layers": layers, "scan_layers": scan, "remat": remat, "compile_s": round(compile_s, 2),
          "xla_temp_mib": round(stats.temp_size_in_bytes / MIB, 1),
          "estimate_mib": round(estimate / MIB, 1),
          "grads_mib": round(stats.output_size_in_bytes / MIB, 1)}


def generation_seconds(args, layers: int, scan: bool) -> dict:
  cfg = model_config(args, layers, scan, "none")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: PolicyModel(cfg, nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), params)
  sampler = sampling.make_sampler(
      graphdef, sampling.SamplingConfig(max_new_tokens=32, min_new_tokens=32), eos_id=2,
      pad_id=0)
  prompts = jnp.ones((args.batch, args.seq // 2), jnp.int32)
  call = lambda: jax.block_until_ready(sampler(params, prompts, prompts, jax.random.key(0)))
  call()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return {"layers": layers, "scan_layers": scan, "generate_s": round(min(times), 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[8, 22])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=2048)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--remat", nargs="+", default=list(REMAT_CHOICES), choices=REMAT_CHOICES)
  parser.add_argument("--generate", action="store_true", help="also time the sampler")
  args = parser.parse_args()
  for layers in args.layers:
    for scan in (False, True):
      for remat in args.remat:
        print(json.dumps(train_step_memory(args, layers, scan, remat)), flush=True)
      if args.generate:
        print(json.dumps(generation_seconds(args, layers, scan)), flush=True)


if __name__ == "__main__":
  main()
