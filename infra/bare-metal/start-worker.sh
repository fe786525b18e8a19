#!/usr/bin/env bash
# Bare-metal variant, each MI350X node: join the head as a Ray worker with its 8 GPUs.
#   HEAD=10.0.0.1 ./start-worker.sh
set -euo pipefail
: "${HEAD:?set HEAD to the head node address}"
ray start --address="${HEAD}:6379" --num-cpus="${NUM_CPUS:-96}" --num-gpus=8 --resources='{"mi350x": 8}' \
  --object-store-memory=$((16 * 1024 * 1024 * 1024))
