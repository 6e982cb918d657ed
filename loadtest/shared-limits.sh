#!/usr/bin/env bash
# Issue 18's measurement: two memex processes (tiny model) serve one key whose limit is 5 rps,
# burst 10, and k6 (loadtest/shared_limits.js) offers 20 requests per second over both for 60 s.
# Run twice: with the limits shared through a local redis-server, then without (each process
# limiting the key to half on its own), to compare what the Redis check adds to a refusal's
# latency at the same load.
# Prints accepted/s across both against 5 + burst/duration, the p99 of the 429s (their only work
# is the limit check) and the p99 of the Redis round trips (memex_limits_backend_duration_seconds).
#
#   loadtest/shared-limits.sh [--binary PATH] [--duration 60] [--rate 20]
#
# Needs redis-server (Debian's package) and k6 (scripts/fetch-models.sh --k6). Results, logs and
# k6 summaries go to loadtest/results/<time>-shared-limits/.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY="${CARGO_TARGET_DIR:-/var/tmp/memex-target}/release/memex"
DURATION=60
RATE=20
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) BINARY="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
K6="$(command -v k6 || echo .cache/bin/k6)"
[[ -x "$BINARY" ]] || { echo "no memex binary at $BINARY (cargo build --release, or --binary)" >&2; exit 2; }
[[ -x "$K6" ]] || { echo "no k6: scripts/fetch-models.sh --k6" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "no redis-server: apt-get install redis-server" >&2; exit 2; }

LIMIT_RPS=5
BURST=10
KEY=shared-limits-loadtest-key
OUT="loadtest/results/$(date +%Y%m%d-%H%M%S)-shared-limits"
mkdir -p "$OUT"
"$BINARY" tiny-model "$OUT/model" >/dev/null
echo "$KEY rps=$LIMIT_RPS burst=$BURST tpm=0" >"$OUT/keys"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

REDIS_PORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=($!)

# start NAME PORT [flags...]: a memex process on the tiny model with the load test's bounds.
start() {
  local name=$1 port=$2; shift 2
  MEMEX_KEY_HASH_SECRET=loadtest-secret "$BINARY" serve --model "$OUT/model" --host 127.0.0.1 \
    --port "$port" --api-keys "$OUT/keys" --max-items 2 --max-text-chars 16 --max-label-chars 8 \
    --max-tags 2 --log-json "$@" >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && return 0
    sleep 0.2
  done
  echo "$name never ready: $OUT/$name.log" >&2; exit 1
}

# Median and p99 of the Redis round trips from both processes' histograms, interpolated within
# the bucket as Prometheus' histogram_quantile does.
backend_quantiles() {
  for port in "$@"; do curl -s "http://127.0.0.1:$port/metrics"; done | python3 -c '
import sys, collections
b = collections.Counter()
for line in sys.stdin:
    if line.startswith("memex_limits_backend_duration_seconds_bucket"):
        le = line.split("le=\"")[1].split("\"")[0]
        b[float(le)] += float(line.rsplit(" ", 1)[1])
bounds = sorted(b)
total = b[float("inf")]
def q(p):
    lo, below = 0.0, 0.0
    for le in bounds:
        if b[le] >= p * total:
            return lo if le == float("inf") else lo + (le - lo) * (p * total - below) / max(b[le] - below, 1)
        lo, below = le, b[le]
print(f"median {q(0.5) * 1000:.2f} ms, p99 {q(0.99) * 1000:.2f} ms over {int(total)} round trips" if total else "none")'
}

run() { # NAME: k6 over both processes
  local name=$1
  RUN="$name" BASE_URLS="http://127.0.0.1:$P1,http://127.0.0.1:$P2" API_KEY=$KEY RATE=$RATE \
    DURATION_S=$DURATION LIMIT_RPS=$LIMIT_RPS BURST=$BURST \
    "$K6" run --quiet --summary-export "$OUT/$name.json" loadtest/shared_limits.js >"$OUT/$name.k6.log" 2>&1 \
    || echo "($name: k6 thresholds failed: see $OUT/$name.k6.log)"
  python3 - "$OUT/$name.json" "$name" <<PY
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
acc = m.get("accepted", {}).get("count", 0)
lim = m.get("limited", {}).get("count", 0)
over = m.get("overloaded", {}).get("count", 0)
p99 = m.get("limited_ms", {}).get("p(99)", float("nan"))
med = m.get("limited_ms", {}).get("med", float("nan"))
d = $DURATION
print(f"{sys.argv[2]}: {acc} accepted, {lim} limited, {over} 503 (refunded) in {d} s: {acc / d:.2f} accepted/s "
      f"(bound {$LIMIT_RPS} + {$BURST}/{d} = {$LIMIT_RPS + $BURST / d:.2f}); 429 latency median {med:.2f} ms, p99 {p99:.2f} ms")
PY
}

P1=$(free_port); P2=$(free_port)
start shared-a "$P1" --limits-redis "redis://127.0.0.1:$REDIS_PORT/"
start shared-b "$P2" --limits-redis "redis://127.0.0.1:$REDIS_PORT/"
run shared
echo "shared: Redis round trip $(backend_quantiles "$P1" "$P2"); backend errors: $(for p in $P1 $P2; do curl -s "http://127.0.0.1:$p/metrics"; done | awk '/^memex_limits_backend_errors_total/ {s += $2} END {print s + 0}')"
kill "${PIDS[1]}" "${PIDS[2]}"; wait "${PIDS[1]}" "${PIDS[2]}" 2>/dev/null || true

# Without Redis, each process limits the key on its own: half the limits each (the division the
# README suggested before shared limits), so that both runs accept and generate about as much
# and the 429s differ only in where the check happens.
echo "$KEY rps=$(python3 -c "print($LIMIT_RPS / 2)") burst=$((BURST / 2)) tpm=0" >"$OUT/keys"
P1=$(free_port); P2=$(free_port)
start local-a "$P1"
start local-b "$P2"
run local
echo "results in $OUT"
