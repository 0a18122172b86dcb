"""Entry point: `python -m rlhf_jax.main --config=configs/ppo.py [--workdir=DIR]`.

Runs the stage named by `config.stage`. Metrics go to `<workdir>/metrics.jsonl`; the final
metrics are printed as one JSON line at the end.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ppo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics (and later checkpoints) go; "
                               "default: ./workdir/<stage>.")

STAGES = ("sft",)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ppo.py")
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage is {config.stage!r}; stages available: {STAGES}.")
  workdir = _WORKDIR.value or os.path.join("workdir", config.stage)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("config:\n%s", config)

  from rlhf_jax import sft  # pylint: disable=g-import-not-at-top  (keeps --help fast)

  result = sft.run(config, workdir)
  print(json.dumps({"stage": config.stage, "workdir": workdir, **result["metrics"]}))


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
