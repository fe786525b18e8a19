#!/usr/bin/env bash
# Bare-metal variant, head node: Ray head (no conversion work on it) + the Prefect worker that runs the
# flows against this cluster. Needs the image's environment (or `make install`) and the S3 settings:
#   export AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... PREFECT_API_URL=...
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL}"
ray start --head --port=6379 --num-cpus=0 --dashboard-host=127.0.0.1
export RAY_ADDRESS=auto REQUANT_HOME="${REQUANT_HOME:-$(cd "$(dirname "$0")/../.." && pwd)}"
exec prefect worker start --pool requant-process --type process
