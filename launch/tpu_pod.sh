#!/usr/bin/env bash
# Runs rlhf_jax on every host of a Cloud TPU VM slice (e.g. v4-32: 4 hosts x 4 chips, or
# v5e-16: 4 hosts x 4 chips): copies this repository to all workers, installs it, and starts
# the same command on each with `gcloud compute tpus tpu-vm ssh --worker=all`. JAX's
# distributed runtime finds the other hosts itself (--distributed=on: worker list from the TPU
# metadata), each host feeds its own slice of every batch, process 0 logs.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/run1 \
#       launch/tpu_pod.sh configs/ppo.py:7b-v4-32 [--config.ppo.num_iterations=100 ...]
#
# WORKDIR must be one directory every host sees (Filestore/NFS or a gcsfuse mount): orbax
# writes each checkpoint from all hosts together, and later stages read earlier ones.
# DRY_RUN=1 prints the gcloud commands instead of running them. Optional: PROJECT,
# REMOTE_DIR (where the code goes on each worker, default ~/rlhf_jax), SKIP_INSTALL=1.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG="$1"
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list)}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
: "${WORKDIR:?set WORKDIR to a directory shared by all hosts (Filestore/NFS/gcsfuse)}"
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=("$TPU_NAME" "--zone=$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  TARGET+=("--project=$PROJECT")
fi

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Every argument is quoted for the remote shell, so overrides with spaces survive ssh.
EXTRA=""
for arg in "$@"; do
  EXTRA+=" $(printf '%q' "$arg")"
done

# 1. The code, as in this working tree (tracked and untracked files, no workdirs or caches).
TARBALL="$(mktemp -t rlhf_jax.XXXXXX.tar.gz)"
trap 'rm -f "$TARBALL"' EXIT
run tar -C "$REPO" --exclude=.git --exclude=workdir --exclude='__pycache__' -czf "$TARBALL" .
run "${GCLOUD[@]}" scp "$TARBALL" "${TARGET[0]}:rlhf_jax.tar.gz" "${TARGET[@]:1}" --worker=all
run "${GCLOUD[@]}" ssh "${TARGET[@]}" --worker=all \
    --command="mkdir -p $REMOTE_DIR && tar -xzf rlhf_jax.tar.gz -C $REMOTE_DIR"

# 2. The package with JAX for TPU, on every host.
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  run "${GCLOUD[@]}" ssh "${TARGET[@]}" --worker=all \
      --command="cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
fi

# 3. The same command on every host, at once. Each prints its own lines; process 0's are the
# logs and metrics (the others only warn).
run "${GCLOUD[@]}" ssh "${TARGET[@]}" --worker=all \
    --command="cd $REMOTE_DIR && python3 -m rlhf_jax.main --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR") --distributed=on$EXTRA"
