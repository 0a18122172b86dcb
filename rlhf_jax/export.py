"""Export a finished stage of a run as a Hugging Face checkpoint directory:

    python -m rlhf_jax.export --workdir W --stage ppo --out DIR [--max_shard_gb 5]

A policy stage (sft, ppo, grpo, rloo, reinforce_pp, dpo) becomes a `LlamaForCausalLM`
(`Qwen2ForCausalLM` for a model imported from Qwen2: it has q/k/v biases) with the run's
tokenizer; `--stage rm` a `*ForSequenceClassification` with one label plus
`reward_normalization.json` (see models/hf_export.py for the weights, export_tokenizer.py for
the tokenizer kinds).

Where things are: `<W>/<stage>/checkpoints` holds the final params and `summary.json` marks a
finished stage. The RL and DPO stages save no model config or tokenizer of their own: theirs
are the SFT run's they started from (`settings.json`'s `sft_checkpoint`, else `<W>/sft`).
PPO's checkpoint is the actor-critic; only its policy is exported. A LoRA stage's checkpoint
holds adapters only: they are merged into the base its `lora.json` points at. Every check
runs before
anything is written, and the files go to a temporary folder beside `--out` that is renamed
into place at the end, so a failed export leaves no partial `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import uuid
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from rlhf_jax import artifacts, export_tokenizer, sharding
from rlhf_jax.fileio import write_json
from rlhf_jax.config import RL_STAGES
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.models import PolicyModel, RewardModel, TransformerConfig, hf_export, lora
from rlhf_jax.train import checkpoint

POLICY_STAGES = ("sft",) + RL_STAGES + ("dpo",)
STAGES = POLICY_STAGES + ("rm",)
DEFAULT_MAX_POSITIONS = 2048  # transformers' LlamaConfig default, when the run names none
EXPECTED_ERRORS = (ValueError, OSError, KeyError, NotImplementedError)


@dataclasses.dataclass
class Source:
  """A finished stage: where it is, and the model config and tokenizer its params need."""
  stage: str
  folder: str
  model_config: TransformerConfig
  tokenizer: Any
  settings: dict[str, Any]
  normalization: dict[str, float] | None  # the RM's gain and bias

  @property
  def what(self) -> str:
    return "reward" if self.stage == "rm" else "policy"


def _finished_stages(workdir: str) -> str:
  done = [s for s in STAGES if artifacts.finished(os.path.join(workdir, s))]
  return f"finished stages there: {', '.join(done)}" if done else "no stage there is finished"


def locate(workdir: str, stage: str) -> Source:
  """The finished `stage` of `workdir`, with its model config and tokenizer; one error naming
  the flag or file and the fix otherwise."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir} does not exist; give the --workdir of a run "
                            "(the folder holding sft/, rm/, ppo/ ...).")
  if stage == "best_of_n":
    raise ValueError("--stage best_of_n trains no network (it ranks the SFT policy's samples); "
                     "export --stage sft or --stage rm instead.")
  if stage not in STAGES:
    raise ValueError(f"--stage {stage!r} is not a stage with a network; choose one of "
                     f"{', '.join(STAGES)}.")
  folder = os.path.join(workdir, stage)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--stage {stage}: {folder} does not exist "
                            f"({_finished_stages(workdir)}).")
  if not artifacts.finished(folder):
    raise ValueError(f"--stage {stage}: {folder} is an unfinished run (no {artifacts.SUMMARY}, "
                     f"written last); finish it by rerunning its command with --workdir={workdir}"
                     f", or export a finished stage ({_finished_stages(workdir)}).")
  settings = {}
  if os.path.isfile(os.path.join(folder, "settings.json")):
    with open(os.path.join(folder, "settings.json")) as f:
      settings = json.load(f)
  config_dir = folder if stage in ("sft", "rm") else (
      settings.get("sft_checkpoint") or os.path.join(workdir, "sft"))
  needed = ["model_config.json", "tokenizer.json"]
  if stage == "rm":
    needed.append("normalization.json")
  for name in needed:
    if not os.path.isfile(os.path.join(config_dir, name)):
      whose = "" if config_dir == folder else f" (the SFT run the {stage} run started from)"
      raise FileNotFoundError(f"--stage {stage}: {config_dir}{whose} has no {name}; it must be "
                              "the folder of a finished run, left as training wrote it.")
  model_cfg = artifacts.read_model_config(config_dir)
  hf_export.check_exportable(model_cfg, f"--stage {stage} ({folder})")
  with open(os.path.join(config_dir, "tokenizer.json")) as f:
    tok = tokenizer_lib.from_description(json.load(f))
  norm = None
  if stage == "rm":
    with open(os.path.join(folder, "normalization.json")) as f:
      norm = json.load(f)
  return Source(stage, folder, model_cfg, tok, settings, norm)


def restore_params(source: Source) -> tuple[dict, int]:
  """(pure dict of host numpy arrays, step) of the final checkpoint of a finished stage: the
  policy alone for PPO. The tree is read from the checkpoint's own metadata, so this works
  whatever else was trained beside the policy (PPO's critic or shared value head)."""
  ckpt_dir = os.path.join(source.folder, "checkpoints")
  if not os.path.isdir(ckpt_dir):  # Checkpointer would create it
    raise FileNotFoundError(f"--stage {source.stage}: {ckpt_dir} does not exist; rerun that stage "
                            "to write its checkpoints.")
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=0)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"--stage {source.stage}: {ckpt_dir} holds no checkpoint; rerun "
                              "that stage to write it.")
    params = ckpt.restore_params(_abstract_params(os.path.join(ckpt_dir, str(step), "params")),
                                 step=step)
  finally:
    ckpt.close()
  pure = _host_pure_dict(params)
  if source.stage == "ppo":
    if "policy" not in pure:
      raise ValueError(f"{ckpt_dir}/{step}: not a PPO actor-critic checkpoint (no 'policy').")
    pure = pure["policy"]
  if artifacts.read_lora(source.folder) is not None:
    pure = _lora_merged(source, pure)
  _check_tree(source, pure, f"{ckpt_dir}/{step}")
  return pure, step


def _lora_merged(source: Source, adapters: dict) -> dict:
  """The dense params of a LoRA stage (whose checkpoint holds `adapters` and heads only): an
  SFT or RM folder loads merged (`artifacts.load_network`); an RL stage's adapters are merged
  into the SFT policy it started from (`lora.json`'s pointer)."""
  lora_cfg, base = artifacts.read_lora(source.folder)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1, num_devices=1))
  if source.stage in ("sft", "rm"):
    load = artifacts.load_reward_model if source.stage == "rm" else artifacts.load_policy
    return _host_pure_dict(nnx.to_pure_dict(load(source.folder, mesh).params))
  if not os.path.isdir(base.get("policy", "")):
    raise FileNotFoundError(f"{source.folder}/{artifacts.LORA}: its base, the SFT folder "
                            f"{base.get('policy')!r}, is gone; LoRA checkpoints hold adapters "
                            "only, so the base is needed to export them.")
  flat = lambda tree: {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}
  full = flat(_host_pure_dict(nnx.to_pure_dict(artifacts.load_policy(base["policy"],
                                                                     mesh).params)))
  full.update(flat(adapters))  # checkpoint keys are strings ("0"), nnx's layer indices ints
  return lora.merge_pure(traverse_util.unflatten_dict(full), lora_cfg.scale)


def _host_pure_dict(tree):
  """Numpy arrays in nested dicts. Stages save `nnx.State`s, whose parameters a checkpoint
  holds as {"value": array}; a pure dict (nnx.to_pure_dict) holds the arrays themselves."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return np.asarray(jax.device_get(tree["value"]))
    return {k: _host_pure_dict(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


def _abstract_params(params_dir: str):
  """ShapeDtypeStructs of a checkpoint's `params` item, on this host's first device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir))
  except Exception as e:  # pylint: disable=broad-except  # any unreadable metadata: one line
    why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    raise ValueError(f"{params_dir}: the final checkpoint is damaged ({why}); rerun that stage "
                     "to rewrite it.") from e
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      getattr(meta, "tree", meta))


def _flat(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v.shape})
  return out


def _check_tree(source: Source, pure: dict, where: str) -> None:
  """The restored params must be exactly those of the model config (names and shapes)."""
  model_cls = RewardModel if source.what == "reward" else PolicyModel
  cfg = source.model_config
  _, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))
  want, got = _flat(nnx.to_pure_dict(abstract)), _flat(pure)
  wrong = sorted(set(want) ^ set(got)) or sorted(k for k in want if tuple(want[k]) != got[k])
  if wrong:
    hint = ("was the SFT folder retrained after this stage?" if source.stage in POLICY_STAGES[1:]
            else "were the folder's files changed after training? Rerun that stage.")
    raise ValueError(f"{where}: the params do not fit the run's model_config.json (they differ "
                     f"at {wrong[:4]}); {hint}")


def max_positions(settings: dict[str, Any]) -> int:
  """`max_position_embeddings` of the pretrained checkpoint the run started from (its
  config.json, or a GGUF's `<arch>.context_length`), else transformers' default. RoPE has no
  table, so this is the context length readers assume, not a limit of the weights."""
  from rlhf_jax.models import gguf_import, pretrained  # pylint: disable=g-import-not-at-top
  source = settings.get("init_from") or ""
  try:
    path = pretrained.resolve(source) if source else ""
    if path and os.path.isdir(path):
      with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["max_position_embeddings"])
    if path.endswith(".gguf"):
      fields = gguf_import.open_reader(path).fields
      arch = fields["general.architecture"].contents()
      return int(fields[f"{arch}.context_length"].contents())
  except (OSError, ValueError, KeyError, TypeError):
    pass  # the source moved or says nothing: the default
  return DEFAULT_MAX_POSITIONS


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out {out} is a file; give a directory path.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"--out {out} already exists and is not empty; choose another --out or "
                          "pass --overwrite to replace it.")


def _write(source: Source, pure: dict, tmp: str, max_pos: int, shard_bytes: int) -> list[str]:
  """Every file of the export into `tmp`; the lines that describe them."""
  cfg, what = source.model_config, source.what
  tok = export_tokenizer.write(source.tokenizer, tmp, max_pos)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  hf = hf_export.hf_config(cfg, what, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           max_position_embeddings=max_pos)
  files = ["config.json"]
  if what == "policy":
    tensors = hf_export.policy_to_hf(cfg, pure)
    files.append("generation_config.json")
    write_json(os.path.join(tmp, "generation_config.json"), ids)
  else:
    tensors, head_bias = hf_export.reward_to_hf(cfg, pure)
    files.append("reward_normalization.json")
    write_json(os.path.join(tmp, "reward_normalization.json"), {
        "gain": source.normalization["gain"], "bias": source.normalization["bias"],
        "head_bias": head_bias,
        "raw_score": "logits[:, 0] + head_bias (transformers' score layer has no bias)",
        "normalized_score": "gain * (logits[:, 0] + head_bias) + bias (what the RL stages "
                            "optimise)"})
  write_json(os.path.join(tmp, "config.json"), hf)
  files += hf_export.write_safetensors(tensors, tmp, shard_bytes)
  size = sum(x.nbytes for x in tensors.values())
  return [f"{hf['architectures'][0]} ({size / 2**20:.1f} MiB float32): {', '.join(files)}",
          f"tokenizer ({tokenizer_lib.describe(source.tokenizer)['kind']}): "
          f"{', '.join(tok.files) or 'none'}", *tok.notes]


def export(workdir: str, stage: str, out: str, max_shard_gb: float = 5.0,
           overwrite: bool = False, max_position_embeddings: int = 0) -> list[str]:
  """Writes the Hugging Face export of `<workdir>/<stage>` to `out`; lines to print."""
  if not max_shard_gb > 0:
    raise ValueError(f"--max_shard_gb must be positive, got {max_shard_gb}.")
  out = os.path.abspath(out)
  _check_out(out, overwrite)
  source = locate(workdir, stage)
  pure, step = restore_params(source)
  max_pos = max_position_embeddings or max_positions(source.settings)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    lines = _write(source, pure, tmp, max_pos, int(max_shard_gb * 1e9))
    _move_into_place(tmp, out)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return [f"exported {source.folder} (step {step}) to {out}", *lines]


def _move_into_place(tmp: str, out: str) -> None:
  """Renames the finished `tmp` to `out`; a previous `out` (--overwrite) is moved aside first
  and deleted only once the new one is in place (put back if the rename fails)."""
  aside = None
  if os.path.isdir(out):
    aside = f"{out}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, aside)
  try:
    os.rename(tmp, out)
  except OSError:
    if aside:
      os.rename(aside, out)
    raise
  if aside:
    shutil.rmtree(aside)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, like every other error of this command
    sys.stderr.write(f"error: {message} (see --help)\n")
    sys.exit(2)


def main(argv=None) -> int:
  parser = _Parser(prog="python -m rlhf_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--stage", required=True, help=f"one of {', '.join(STAGES)}")
  parser.add_argument("--out", required=True, help="the directory to write (must not exist or "
                      "be empty, unless --overwrite)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="split the weights into "
                      "model-0000k-of-0000n.safetensors files of at most this many GB")
  parser.add_argument("--max_position_embeddings", type=int, default=0, help="config.json's "
                      "context length; 0: the pretrained source's, else 2048")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--verbose_errors", action="store_true", help="full tracebacks")
  args = parser.parse_args(argv)
  try:
    lines = export(args.workdir, args.stage, args.out, args.max_shard_gb, args.overwrite,
                   args.max_position_embeddings)
  except EXPECTED_ERRORS as e:
    if args.verbose_errors:
      raise
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    sys.stderr.write(f"error: {type(e).__name__}: {' '.join(message.split())}\n")
    return 1
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  if "JAX_PLATFORMS" not in os.environ:  # host work: never claim an accelerator's memory
    jax.config.update("jax_platforms", "cpu")
  code = main()
  if code:
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown, as rlhf_jax.main does: orbax's background threads would
    # print "Event loop is closed" tracebacks after the one line.
    os._exit(code)  # pylint: disable=protected-access
