#!/usr/bin/env bash
# The GPU check, one command on the GPU machine, from the kit scripts/gpu-kit.sh built (no cargo,
# no network there). docs/gpu.md says how to run it and what each number means.
#
#   scripts/gpu-check.sh [--out DIR]                      # on the GPU machine (the kit in .gpu-kit/)
#   scripts/gpu-check.sh --device cpu-tensors --out DIR   # the dry run: same flow, CPU, small shapes
#
# Phases, in order, each under its own timeout and all inside --budget seconds (default 480, the
# issue's 8 minutes), measured here: unpack (sha256 against the manifest), gpu (nvidia-smi, the
# CUDA runtime libraries the machine's Python packages ship), unit-tests (the tensor path and the
# paged-attention op against the CPU kernels), engine-tests (tests/engine.rs with the tensor path
# on the device), models (the Qwen3-0.6B shape with the Qwen3 tokenizer; the dry run uses the tiny
# model), bench (engine bench: prefill and decode tokens/s at 1, 8, 32, 128, 256 concurrent),
# http (memex serve + scripts/gpu_load.py at 64 concurrent), bench-gather (decode with the
# reference gather path, for the paged kernel's gain). A phase that fails or times out is
# recorded and the next one runs; one that would start with too little budget left is skipped.
#
# Writes to --out (default $OUT, else ./gpu-check-out): gpu-check.json and gpu-check.md (the
# summary), bench.json, bench-gather.json, http.json and gpu-check.log (every phase's output).
# Exit status 0 only when every phase passed.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
device=cuda
kit="$root/.gpu-kit"
out="${OUT:-$root/gpu-check-out}"
budget=480
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --kit) kit="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        *) echo "usage: scripts/gpu-check.sh [--device cuda|cpu-tensors] [--kit DIR] [--out DIR] [--budget S]" >&2; exit 2 ;;
    esac
done
case "$device" in cuda | cpu-tensors) ;; *) echo "--device: cuda or cpu-tensors" >&2; exit 2 ;; esac

mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
log="$out/gpu-check.log"
phases="$work/phases.jsonl"
: > "$log"
: > "$phases"
rm -f "$out"/{gpu-check.json,gpu-check.md,bench.json,bench-gather.json,http.json}
start=$(date +%s.%N)
server_pid=""
smi_pid=""
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
    [[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

elapsed() { python3 -c "import time; print(f'{time.time() - $start:.1f}')"; }

# phase NAME TIMEOUT COMMAND...: runs COMMAND under min(TIMEOUT, what the budget leaves, less 20 s
# kept for the summary), appends its output to the log, records its outcome.
phase() {
    local name="$1" limit="$2"
    shift 2
    local left
    left=$(python3 -c "import time; print(int($budget - (time.time() - $start) - 20))")
    local t=$((limit < left ? limit : left))
    if [[ $t -lt 5 ]]; then
        echo "{\"phase\": \"$name\", \"status\": \"skipped\", \"seconds\": 0, \"note\": \"budget spent\"}" >> "$phases"
        echo "== $name: skipped (budget spent at $(elapsed) s)" | tee -a "$log"
        return 1
    fi
    echo "== $name (timeout ${t} s, at $(elapsed) s)" | tee -a "$log"
    local s rc status
    s=$(date +%s.%N)
    # Through bash, so a phase may be one of this script's (exported) functions.
    timeout -k 5 "$t" bash -c '"$@"' phase "$@" >> "$log" 2>&1
    rc=$?
    local secs
    secs=$(python3 -c "import time; print(f'{time.time() - $s:.1f}')")
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "{\"phase\": \"$name\", \"status\": \"$status\", \"seconds\": $secs, \"exit\": $rc, \"timeout\": $t}" >> "$phases"
    echo "== $name: $status in $secs s (exit $rc)" | tee -a "$log"
    [[ $status == ok ]]
}

# The summary: gpu-check.json and gpu-check.md from the phases and the results; exit status 0
# only when every phase passed.
summary() {
    python3 - "$out" "$phases" "$work/gpu-memory.txt" "$kit/manifest.json" "$device" "$start" "$budget" <<'PY'

import json, os, sys, time
out, phases_path, mem_path, manifest_path, device, start, budget = sys.argv[1:8]
total = time.time() - float(start)
phases = [json.loads(l) for l in open(phases_path) if l.strip()]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
bench, gather, http = load("bench.json"), load("bench-gather.json"), load("http.json")
try:
    mem = [int(x) for x in open(mem_path).read().split() if x.isdigit()]
except OSError:
    mem = []
try:
    manifest = json.load(open(manifest_path))
except (OSError, ValueError):
    manifest = {}
ok = all(p["status"] == "ok" for p in phases)
summary = {
    "device": device,
    "kit": {k: manifest.get(k) for k in ("mode", "commit", "built")},
    "passed": ok,
    "seconds": round(total, 1),
    "budget_seconds": int(budget),
    "phases": phases,
    "bench": bench,
    "bench_gather": gather,
    "http": http,
    "gpu_memory_peak_mib": max(mem) if mem else None,
}
targets = {}
for r in bench or []:
    if r.get("concurrency") == 256:
        targets["decode_tok_s_at_256"] = {"got": r["decode_tokens_per_s"], "target": 20000}
    if r.get("concurrency") == 32:
        targets["prefill_tok_ms_at_32"] = {"got": r["prefill_tokens_per_s"] / 1000, "target": 1000}
summary["targets"] = targets
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)

md = [f"# GPU check ({device})", "",
      f"Kit {manifest.get('mode')} from {manifest.get('commit')}; {'all phases passed' if ok else 'NOT all phases passed'}; "
      f"{total:.0f} s of a {budget} s budget; GPU memory peak: {summary['gpu_memory_peak_mib']} MiB.", "",
      "| phase | status | seconds |", "|---|---|---|"]
md += [f"| {p['phase']} | {p['status']} | {p['seconds']} |" for p in phases]
def table(rows, title):
    if not rows:
        return [f"", f"{title}: no results."]
    t = ["", title, "", "| model | engine | concurrent | prompt tokens | prefill tok/s | generated tokens | decode tok/s |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        t.append(f"| {r['model']} | {r['engine']} | {r['concurrency']} | {r['prompt_tokens_per_request']} | "
                 f"{r['prefill_tokens_per_s']:.0f} | {r['generated_tokens_per_request']} | {r['decode_tokens_per_s']:.0f} |")
    return t
md += table(bench, "Engine bench (paged decode attention)")
md += table(gather, "Engine bench, decode with the gather reference path")
if http:
    lat = http["ok_latency_s"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    md += ["", f"HTTP: {http['concurrency']} concurrent for {http['window_s']} s ({http['size_class']}-token dialogues, all three branches): "
           f"{http['ok_per_s']} answered requests/s; statuses {http['by_status']}; 200 latency p50 {fmt(lat['p50'])} s, "
           f"p95 {fmt(lat['p95'])} s, p99 {fmt(lat['p99'])} s."]
if targets:
    md += ["", "Targets: " + "; ".join(f"{k} {v['got']:.0f} (target {v['target']})" for k, v in targets.items())]
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if ok else 1)
PY
}

# ---------------------------------------------------------------- unpack
bin="$work/kit/bin"
export kit work bin
unpack() {
    python3 - "$kit" "$work/kit" <<'PY'
import hashlib, json, os, sys, tarfile
kit, dest = sys.argv[1:3]
manifest = json.load(open(os.path.join(kit, "manifest.json")))
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
archive = os.path.join(kit, manifest["archive"]["name"])
assert sha(archive) == manifest["archive"]["sha256"], "the archive's sha256 differs from the manifest"
with tarfile.open(archive, "r:xz") as t:
    t.extractall(dest, filter="data")
for name, want in manifest["files"].items():
    got = sha(os.path.join(dest, name))
    assert got == want["sha256"], f"{name}: sha256 {got}, manifest {want['sha256']}"
for f in os.listdir(os.path.join(dest, "bin")):
    os.chmod(os.path.join(dest, "bin", f), 0o755)
print(f"kit {manifest['mode']} from {manifest['commit']} built {manifest['built']}: {len(manifest['files'])} files verified")
if manifest["mode"] == "cpu" and os.environ.get("CHECK_DEVICE") == "cuda":
    sys.exit("this is a CPU kit (scripts/gpu-kit.sh --cpu); the GPU check needs scripts/gpu-kit.sh")
PY
}
export -f unpack
export CHECK_DEVICE="$device"
if ! phase unpack 90 unpack; then
    echo "gpu-check: the kit could not be unpacked; nothing else can run" | tee -a "$log"
    summary
    exit 1
fi

# ---------------------------------------------------------------- gpu and libraries
if [[ $device == cuda ]]; then
    # The CUDA 13 runtime, cuBLAS and cuRAND the binaries link, from the NVIDIA Python packages
    # PyTorch installed (nvidia/*/lib), then whatever ldconfig knows; the driver's libcuda.so.1
    # comes from the machine.
    libdirs=$(python3 - <<'PY' 2>/dev/null
import glob, importlib.util, os
dirs = []
spec = importlib.util.find_spec("nvidia")
for base in (spec.submodule_search_locations or []) if spec else []:
    dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(base, "cu*", "lib")))
print(":".join(dict.fromkeys(dirs)))
PY
)
    export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    gpu_info() {
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        ldconfig -p | grep -E "libcuda\.so|libcudart|libcublas" || true
        local missing
        missing=$(ldd "$bin/memex" | grep "not found")
        ldd "$bin/memex" | grep -E "cuda|cublas|curand"
        if [[ -n $missing ]]; then
            echo "unresolved libraries: $missing"
            return 1
        fi
    }
    export -f gpu_info
    phase gpu 30 gpu_info
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$work/gpu-memory.txt" 2>/dev/null &
    smi_pid=$!
    export MEMEX_TEST_TENSOR_DEVICE=cuda
fi

# ---------------------------------------------------------------- tests
# tests/engine.rs runs memex from the path cargo built it at (CARGO_BIN_EXE_memex).
built_at="$(cat "$work/kit/memex-built-at" 2>/dev/null)"
if [[ -n $built_at && ! -e $built_at ]]; then
    mkdir -p "$(dirname "$built_at")" && ln -s "$bin/memex" "$built_at"
fi

# The unit tests of the tensor path (TensorModel vs the CPU kernels, both decode paths) and of the
# paged-attention op (against its definition, in f32, f16 and bf16).
phase unit-tests 120 "$bin/lib-tests" paged_attention tensor_model
# The whole engine with the tensor path on the device, beside the CPU kernels and mistralrs (CPU).
phase engine-tests 150 "$bin/engine-tests"

# ---------------------------------------------------------------- models
if [[ $device == cuda ]]; then
    model_name=qwen3-0.6b
    model="$work/qwen3-0.6b"
    phase models 90 "$bin/memex" tiny-model --preset qwen3-0.6b --tokenizer "$work/kit/tokenizer" "$model"
    levels=1,8,32,128,256
    bench_env=(MEMEX_BENCH_MODELS="$model_name=$model" MEMEX_BENCH_MAX_RUNNING=256
        MEMEX_BENCH_KV_MB=48000 MEMEX_BENCH_STEP_TOKENS=16384 MEMEX_BENCH_DECODE_CHARS=150)
    serve_flags=(--max-num-seqs 256 --kv-cache-mb 40000 --step-tokens 16384 --max-slot-wait 60)
    load_flags=(--concurrency 64 --duration 60 --size 1000)
else
    # The dry run: the bench's own tiny model, small levels and outputs.
    model_name=tiny-qwen3
    model="$work/tiny"
    phase models 30 "$bin/memex" tiny-model "$model"
    levels=1,4
    bench_env=(MEMEX_BENCH_DECODE_CHARS=32 MEMEX_BENCH_KV_MB=256)
    serve_flags=(--max-num-seqs 16 --kv-cache-mb 256 --max-input-tokens 30000 --max-slot-wait 60)
    load_flags=(--concurrency 4 --duration 10 --size 50)
fi

# ---------------------------------------------------------------- engine bench
phase bench 200 env MEMEX_ROOT="$root" MEMEX_BENCH_NATIVE_DEVICE="$device" \
    MEMEX_BENCH_LEVELS="$levels" MEMEX_BENCH_ROUNDS=1 MEMEX_BENCH_OUT="$out/bench.json" \
    "${bench_env[@]}" "$bin/engine-bench" "$model_name"

# ---------------------------------------------------------------- HTTP
port=18080
# The demo bounds (scripts/demo-limits.env): a random-weight model writes noise until its
# grammar or its output bound stops it; these keep a request's worst case near real ones'.
while IFS='=' read -r name value; do
    [[ -z "$name" || "$name" == \#* ]] || export "$name=$value"
done < scripts/demo-limits.env
"$bin/memex" serve --model "$model" --engine native --native-device "$device" --no-auth \
    --host 127.0.0.1 --port "$port" "${serve_flags[@]}" >> "$work/server.log" 2>&1 &
server_pid=$!
export port server_pid
ready() {
    until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health/ready', timeout=2)" 2>/dev/null; do
        kill -0 "$server_pid" 2>/dev/null || { echo "the server exited"; return 1; }
        sleep 1
    done
}
export -f ready
if phase http-ready 120 ready; then
    phase http 150 python3 scripts/gpu_load.py --url "http://127.0.0.1:$port" --out "$out/http.json" "${load_flags[@]}"
    python3 -c "
import urllib.request
for l in urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=5).read().decode().splitlines():
    if l.startswith(('memex_engine', 'memex_prefill', 'memex_requests', 'memex_rejections', 'memex_admission')):
        print(l)" >> "$log" 2>&1
fi
kill "$server_pid" 2>/dev/null
wait "$server_pid" 2>/dev/null
server_pid=""
{ echo "== server log (last 60 lines)"; tail -n 60 "$work/server.log"; } >> "$log"

# ---------------------------------------------------------------- the reference decode path
if [[ $device == cuda ]]; then
    phase bench-gather 90 env MEMEX_ROOT="$root" MEMEX_BENCH_NATIVE_DEVICE="$device" \
        MEMEX_BENCH_LEVELS=32,256 MEMEX_BENCH_ROUNDS=1 MEMEX_BENCH_DECODE_ONLY=1 \
        MEMEX_BENCH_GATHER_DECODE=1 MEMEX_BENCH_OUT="$out/bench-gather.json" \
        "${bench_env[@]}" "$bin/engine-bench" "$model_name"
fi

[[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
smi_pid=""

summary
exit $?
