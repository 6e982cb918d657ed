#!/usr/bin/env bash
# Builds and packs everything scripts/gpu-check.sh needs on a GPU machine that has no cargo and
# no network, into the ignored folder .gpu-kit/ (docs/gpu.md):
#
#   scripts/gpu-kit.sh          # the CUDA kit: `native-cuda` release build (scripts/build-cuda.sh)
#   scripts/gpu-kit.sh --cpu    # a CPU kit (dev profile, what `cargo test` already built) for
#                               # `scripts/gpu-check.sh --device cpu-tensors`, the dry run
#
# .gpu-kit/kit.tar.xz holds bin/memex, bin/lib-tests (the unit tests: the tensor path and the
# paged-attention op against the CPU kernels), bin/engine-tests (tests/engine.rs), bin/engine-bench
# (benches/engine.rs) and the Qwen3 tokenizer (the 0.6B-shape model's, so its prompts have real
# token counts); .gpu-kit/manifest.json their sha256 and sizes. The CUDA kit, with the tracked
# tree, must travel in one device call: at most 60 MiB, checked here.
#
# Why `native-cuda` and not `cuda`: the kit checks the native engine's GPU path; mistralrs then
# runs on the CPU, and its CUDA kernels (most of a cold CUDA build's ~47 minutes, and of the
# binaries' size) stay out.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode=cuda
case "${1:-}" in
    --cpu) mode=cpu ;;
    "") ;;
    *) echo "usage: scripts/gpu-kit.sh [--cpu]" >&2; exit 2 ;;
esac
kit="${GPU_KIT_DIR:-$root/.gpu-kit}"
limit_mib=60

if [[ $mode == cuda ]]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memex-cuda-target}"
    cargo=(scripts/build-cuda.sh)
    flags=(--release --features native-cuda)
    xz_flags=(-T1 --lzma2=preset=9e,dict=256MiB)
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memex-target}"
    cargo=(cargo)
    flags=()
    xz_flags=(-T0 -0)
fi
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/tokenizer"

echo "== building ($mode): the unit tests, tests/engine.rs (and the memex it spawns), benches/engine.rs" >&2
# One build: tests/engine.rs needs the memex binary, so this builds it too, with the features the
# tests unify (a separate `cargo build --bin memex` would compile memex and mistralrs-core once
# more for the dev-dependencies' feature set), and it is the very binary the tests spawn.
"${cargo[@]}" test --locked --no-run "${flags[@]}" --lib --test engine --bench engine \
    --message-format=json-render-diagnostics > "$stage/tests.json"

# Each artefact by what it is (the test and the bench are both called `engine`).
python3 - "$stage" <<'PY'
import json, os, shutil, sys
stage = sys.argv[1]
want = {("bin", "memex", False): "memex", ("lib", "memex", True): "lib-tests",
        ("test", "engine", True): "engine-tests", ("bench", "engine", True): "engine-bench"}
found = {}
for line in open(os.path.join(stage, "tests.json")):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    key = (m["target"]["kind"][0], m["target"]["name"], m["profile"]["test"])
    if key in want:
        found[want[key]] = m["executable"]
missing = set(want.values()) - set(found)
if missing:
    sys.exit(f"gpu-kit: cargo built no {sorted(missing)}")
for name, path in found.items():
    shutil.copy(path, os.path.join(stage, "bin", name))
# The test binaries spawn memex from where cargo built it (CARGO_BIN_EXE_memex): gpu-check.sh
# puts the kit's one there.
open(os.path.join(stage, "memex-built-at"), "w").write(found["memex"])
PY
strip "$stage"/bin/*

tokenizer=.cache/models/qwen3-tokenizer
[[ -f $tokenizer/tokenizer.json ]] || scripts/fetch-models.sh --qwen3-tokenizer >&2
cp "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json" "$stage/tokenizer/"

echo "== packing" >&2
mkdir -p "$kit"
rm -f "$kit/kit.tar.xz" "$kit/manifest.json"
# Similar binaries side by side: the dictionary then spans the previous one, and what they share
# (candle's kernels, the language models, mistralrs) is stored about once.
(cd "$stage" && tar -cf - memex-built-at bin/memex bin/engine-bench bin/engine-tests bin/lib-tests tokenizer) \
    | xz "${xz_flags[@]}" > "$kit/kit.tar.xz"

python3 - "$stage" "$kit" "$mode" <<'PY'
import hashlib, json, os, subprocess, sys, time
stage, kit, mode = sys.argv[1:4]
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
files = {}
for sub in ("bin", "tokenizer"):
    for name in sorted(os.listdir(os.path.join(stage, sub))):
        p = os.path.join(stage, sub, name)
        files[f"{sub}/{name}"] = {"sha256": sha(p), "bytes": os.path.getsize(p)}
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout.strip())
manifest = {
    "mode": mode,
    "commit": commit + ("+dirty" if dirty else ""),
    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "archive": {"name": "kit.tar.xz", "sha256": sha(os.path.join(kit, "kit.tar.xz")),
                "bytes": os.path.getsize(os.path.join(kit, "kit.tar.xz"))},
    "files": files,
}
json.dump(manifest, open(os.path.join(kit, "manifest.json"), "w"), indent=2)
PY

kit_bytes=$(stat -c %s "$kit/kit.tar.xz")
tree_bytes=$(git archive HEAD | wc -c)
total_mib=$(( (kit_bytes + tree_bytes + (1 << 20) - 1) >> 20 ))
echo "gpu-kit: $kit/kit.tar.xz $((kit_bytes >> 20)) MiB + tracked tree $((tree_bytes >> 10)) KiB = ${total_mib} MiB (limit ${limit_mib} MiB)"
if [[ $mode == cuda && $total_mib -gt $limit_mib ]]; then
    echo "gpu-kit: over the ${limit_mib} MiB a device call carries" >&2
    exit 1
fi
