"""The algorithm family side by side on one SFT policy and one reward model.

    python -m rlhf_jax.compare --config=configs/compare.py [--workdir=DIR]
    python -m rlhf_jax.compare --config=configs/compare.py:test --config.algorithms="('grpo','dpo')"

trains SFT and the RM once (`configs/rm.py` with the same preset and overrides), then each of
`algorithms` from them in the same workdir, each in its own process (so its wall time and
peak RSS are its own; `os.wait4` reads the child's peak RSS). The online RL algorithms get the
same budget of sampled responses (`num_responses`; their `num_iterations` follows from it).
Writes `<workdir>/compare/results.{json,md}` and `compare.png` (held-out gold reward vs KL to
the SFT policy, best-of-N as a curve over N) and prints the markdown table:

    algorithm | gold reward SFT -> trained | KL | RM score SFT -> trained | wall | peak RSS
    | responses / tokens sampled in training

A finished algorithm in the workdir is reused (the pipeline's rule), and its row says so
instead of a wall time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from rlhf_jax import fileio, main as main_lib  # its --config (here the comparison's) and --workdir

_ONLY = flags.DEFINE_string("only", "", "Internal: run this one algorithm (or 'rm': SFT and "
                            "the RM) in this process, as the parent command does for each.")
SHARED_RUN = "rm"  # the run that trains SFT and the RM every algorithm starts from


def parse_overrides(text: str) -> dict[str, object]:
  """"a.b=1;c=x" -> {"a.b": 1, "c": "x"} (values as Python literals, else strings)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(";"))):
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"compare overrides: {item!r} is not key=value; separate items with ';'.")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def responses_per_iteration(config, stage: str) -> int:
  s = config[stage]
  return s.data.batch_size * s.get("num_generations", 1)


def algorithm_config(cmp, name: str):
  """The config of one run: `configs/<name>.py:<preset>` with the overrides whose section it
  has, and an online RL algorithm's iterations from the response budget."""
  from rlhf_jax import config as config_lib, scale  # pylint: disable=g-import-not-at-top
  cfg = config_lib.get_config(name, cmp.preset)
  overrides = parse_overrides(cmp.overrides)
  cfg.unlock()
  for key, value in overrides.items():
    if key.split(".")[0] in cfg:
      current = scale._get(cfg, key)  # pylint: disable=protected-access
      if isinstance(current, (int, float)) and not isinstance(current, bool):
        value = type(current)(value)
      scale.apply_overrides(cfg, {key: value})
  if name in config_lib.RL_STAGES:
    cfg[name].num_iterations = max(1, cmp.num_responses // responses_per_iteration(cfg, name))
  cfg.lock()
  return cfg


def check(cmp) -> None:
  """Every run's config is valid and every override reaches one, before anything trains."""
  from rlhf_jax import config as config_lib, validate  # pylint: disable=g-import-not-at-top
  for name in cmp.algorithms:
    if name not in config_lib.STAGES[2:]:
      raise ValueError(f"compare: algorithms has {name!r}; choose from "
                       f"{config_lib.STAGES[2:]}.")
  runs = (SHARED_RUN,) + tuple(cmp.algorithms)
  for key in parse_overrides(cmp.overrides):
    if not any(key.split(".")[0] in config_lib.get_config(n, cmp.preset) for n in runs):
      raise ValueError(f"compare overrides: no run's config has a section for {key!r}.")
  for name in runs:
    validate.check(algorithm_config(cmp, name))


def _child(name: str) -> dict[str, float]:
  """Runs one algorithm in a child process: (wall seconds, peak RSS bytes)."""
  cmd = [sys.executable, "-m", "rlhf_jax.compare", *sys.argv[1:], f"--only={name}"]
  logging.info("[compare] %s: %s", name, " ".join(cmd))
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f"compare: the {name} run failed (exit {proc.returncode}); its error is "
                       "above. Fix it and rerun: finished runs are reused.")
  return {"wall_s": time.perf_counter() - t0, "peak_rss_bytes": usage.ru_maxrss * 1024}


def _sampled(cmp, workdir: str, name: str) -> tuple[int, int | None]:
  """(responses, tokens) sampled in training (best-of-N: to choose from; DPO: none)."""
  from rlhf_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  cfg = algorithm_config(cmp, name)
  if name == "best_of_n":
    return cfg.best_of_n.data.num_eval_prompts * max(cfg.best_of_n.n), None
  if name not in config_lib.RL_STAGES:
    return 0, 0
  per_iter = responses_per_iteration(cfg, name)
  lengths = [r["response_length"] for r in metrics_lib.read_rows(workdir, name)
             if "response_length" in r]
  return per_iter * cfg[name].num_iterations, round(per_iter * sum(lengths))


def result_row(cmp, workdir: str, name: str, run: dict) -> dict:
  from rlhf_jax import artifacts  # pylint: disable=g-import-not-at-top
  s = artifacts.read_summary(os.path.join(workdir, name))
  responses, tokens = _sampled(cmp, workdir, name)
  return {"algorithm": name, "sft_gold_reward": s.get("final/sft_gold_reward"),
          "gold_reward": s.get(f"final/{name}_gold_reward"), "kl": s.get("final/kl"),
          "sft_rm_score": s.get("final/sft_rm_score"), "rm_score": s.get(f"final/{name}_rm_score"),
          "responses_sampled": responses, "tokens_sampled": tokens, **run}


def markdown(rows: list[dict], shared: dict) -> str:
  f = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"
  lines = ["| algorithm | gold reward: SFT → trained | KL to SFT (nats) | RM score: SFT → "
           "trained | wall time | peak RSS | responses / tokens sampled |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    wall = "reused" if r.get("reused") else f"{r['wall_s'] / 60:.1f} min"
    rss = "–" if r.get("reused") else f"{r['peak_rss_bytes'] / 2**30:.2f} GiB"
    tokens = "–" if r["tokens_sampled"] is None else f"{r['tokens_sampled']:,}"
    lines.append(f"| {r['algorithm']} | {f(r['sft_gold_reward'])} → {f(r['gold_reward'])} | "
                 f"{f(r['kl'], 2)} | {f(r['sft_rm_score'], 2)} → {f(r['rm_score'], 2)} | "
                 f"{wall} | {rss} | {r['responses_sampled']:,} / {tokens} |")
  if not shared.get("reused"):
    lines.append(f"\nSFT + preference pairs + RM, trained once for all: "
                 f"{shared['wall_s'] / 60:.1f} min, peak RSS "
                 f"{shared['peak_rss_bytes'] / 2**30:.2f} GiB.")
  return "\n".join(lines)


def plot(rows: list[dict], workdir: str, path: str) -> None:
  """Held-out gold reward vs KL to the SFT policy: a point per algorithm, best-of-N's curve."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    if r["gold_reward"] is None or r["kl"] is None:
      continue
    if r["algorithm"] == "best_of_n":
      per_n = [x for x in metrics_lib.read_rows(workdir, "best_of_n")
               if any(k.endswith("/gold_reward") and k.startswith("best_of_n/") for k in x)]
      pts = sorted((x[f"best_of_n/{x['step']}/kl"], x[f"best_of_n/{x['step']}/gold_reward"])
                   for x in per_n if f"best_of_n/{x['step']}/kl" in x)
      ax.plot(*zip(*pts), "o-", label="best-of-N (N = 1, 2, 4, ...)")
    else:
      ax.plot([r["kl"]], [r["gold_reward"]], "o", label=r["algorithm"])
  sft = next((r["sft_gold_reward"] for r in rows if r["sft_gold_reward"] is not None), None)
  if sft is not None:
    ax.axhline(sft, color="grey", ls=":", label="SFT")
  ax.set(xlabel="KL to the SFT policy (nats)", ylabel="held-out gold reward",
         title="Algorithms on one SFT policy and RM")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cmp, workdir = main_lib._CONFIG.value, main_lib._WORKDIR.value  # pylint: disable=protected-access
  if cmp is None:
    raise app.UsageError("--config is required, e.g. --config=configs/compare.py")
  if _ONLY.value:
    main_lib.run(algorithm_config(cmp, _ONLY.value), workdir)
    return
  check(cmp)
  out_dir = os.path.join(workdir, "compare")
  os.makedirs(out_dir, exist_ok=True)
  runs = {}
  for name in (SHARED_RUN,) + tuple(cmp.algorithms):
    reused = os.path.exists(os.path.join(workdir, name, "summary.json"))
    runs[name] = dict(_child(name), reused=reused)
  rows = [result_row(cmp, workdir, name, runs[name]) for name in cmp.algorithms]
  table = markdown(rows, runs[SHARED_RUN])
  fileio.write_json(os.path.join(out_dir, "results.json"),
                    {"config": cmp.to_dict(), "shared_run": runs[SHARED_RUN], "rows": rows})
  fileio.atomic_write(os.path.join(out_dir, "results.md"), table + "\n")
  plot(rows, workdir, os.path.join(out_dir, "compare.png"))
  print(table)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
