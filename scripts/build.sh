#!/usr/bin/env bash
# The container image's build steps, kept in one script: the Dockerfile runs it, and CI runs it
# for the CPU variant, so what the image runs is what CI tested.
#
#   scripts/build.sh [--variant cpu|cuda] [--flash-attn] [--prefix DIR] STEP...
#
# Steps, in the order the image runs them:
#   build-deps    OS packages and the Rust toolchain a build needs (only what is missing)
#   build         cargo build --release --locked --bin memex with the variant's features, strip,
#                 install PREFIX/bin/memex and PREFIX/bin/memex-healthcheck
#   runtime-deps  what the binary needs at run time (CA certificates, curl for the health check;
#                 CUDA: cuBLAS, cuRAND, NVRTC), the non-root user `memex`, and /models
#   check         PREFIX/bin/memex's shared libraries all resolve (the GPU driver's excepted:
#                 the NVIDIA container runtime mounts them), and it runs when it can
#   selftest      start PREFIX/bin/memex the way the image does (MEMEX_* environment only) on the
#                 tiny model, wait until memex-healthcheck passes, stop it with SIGTERM, expect 0
#
# Environment: FLASH_ATTN=1 (same as --flash-attn), CUDA_COMPUTE_CAP (default 90),
# CARGO_TARGET_DIR (default /var/tmp/memex-target),
# RUST_TOOLCHAIN (default stable; only used when cargo is missing), CUDA_HOME (default
# /usr/local/cuda), MEMEX_UID (default 10001).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VARIANT=cpu
FLASH_ATTN="${FLASH_ATTN:-0}"
PREFIX=/usr/local
STEPS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --variant) VARIANT="$2"; shift 2 ;;
    --variant=*) VARIANT="${1#*=}"; shift ;;
    --flash-attn) FLASH_ATTN=1; shift ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) STEPS+=("$1"); shift ;;
  esac
done
case "$VARIANT" in cpu|cuda) ;; *) echo "build.sh: --variant is cpu or cuda, not $VARIANT" >&2; exit 2 ;; esac
[[ ${#STEPS[@]} -gt 0 ]] || { echo "build.sh: name at least one step (see --help)" >&2; exit 2; }
if [[ "$FLASH_ATTN" == 1 && "$VARIANT" != cuda ]]; then
  echo "build.sh: --flash-attn needs --variant cuda" >&2; exit 2
fi

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memex-target}"
MEMEX_UID="${MEMEX_UID:-10001}"

say() { echo "== build.sh ($VARIANT): $*"; }

apt_install() {
  # Only on Debian/Ubuntu as root, and only when something is missing.
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "build.sh: missing packages ${missing[*]} and no root apt-get to install them" >&2
    exit 1
  fi
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  rm -rf /var/lib/apt/lists/*
}

# CUDA packages are named by major-minor: 13.0.1 -> 13-0. The nvidia/cuda images set CUDA_VERSION.
cuda_pkg_version() {
  local v="${CUDA_VERSION:-}"
  if [[ -z "$v" ]] && [[ -x "$CUDA_HOME/bin/nvcc" ]]; then
    v="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
  fi
  [[ -n "$v" ]] || { echo "build.sh: cannot tell the CUDA version (set CUDA_VERSION)" >&2; exit 1; }
  echo "$v" | awk -F. '{print $1 "-" $2}'
}

step_build_deps() {
  if command -v dpkg >/dev/null; then
    apt_install build-essential pkg-config ca-certificates curl
  fi
  if ! command -v cargo >/dev/null; then
    say "installing Rust (${RUST_TOOLCHAIN:-stable}) with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --default-toolchain "${RUST_TOOLCHAIN:-stable}"
  fi
  if [[ "$VARIANT" == cuda ]] && ! command -v nvcc >/dev/null && [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
    echo "build.sh: the cuda variant needs nvcc (CUDA 11.4 to 13.2) on PATH or in \$CUDA_HOME/bin" >&2
    exit 1
  fi
}

step_build() {
  local features=()
  if [[ "$VARIANT" == cuda ]]; then
    export PATH="$CUDA_HOME/bin:$PATH"
    features=(--features "$([[ $FLASH_ATTN == 1 ]] && echo cuda,flash-attn || echo cuda)")
    # Link against the toolkit's libcuda stub; at run time the driver provides the real one.
    if [[ -e "$CUDA_HOME/lib64/stubs/libcuda.so" ]]; then
      export LIBRARY_PATH="$CUDA_HOME/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    fi
    say "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, nvcc $(nvcc --version | sed -n 's/.*release \([^,]*\).*/\1/p')"
  fi
  say "cargo build --release --locked --bin memex ${features[*]}"
  (cd "$ROOT" && cargo build --release --locked --bin memex "${features[@]}")
  install -d "$PREFIX/bin"
  install -m 0755 "$CARGO_TARGET_DIR/release/memex" "$PREFIX/bin/memex"
  if command -v strip >/dev/null; then strip "$PREFIX/bin/memex"; fi
  # The image's HEALTHCHECK: ready means loaded and warmed up (/health/ready).
  cat >"$PREFIX/bin/memex-healthcheck" <<'EOF'
#!/bin/sh
# Exit 0 when the memex on this host answers /health/ready with 200.
exec curl -fsS -o /dev/null --max-time 4 "http://127.0.0.1:${MEMEX_PORT:-8080}/health/ready"
EOF
  chmod 0755 "$PREFIX/bin/memex-healthcheck"
  say "installed $PREFIX/bin/memex ($(du -h "$PREFIX/bin/memex" | cut -f1))"
}

step_runtime_deps() {
  local pkgs=(ca-certificates curl)
  if [[ "$VARIANT" == cuda ]]; then
    local v
    v="$(cuda_pkg_version)"
    # What mistralrs/candle load at run time beyond the CUDA runtime the base image has.
    # nvidia-smi and libcuda come from the host driver (NVIDIA_DRIVER_CAPABILITIES=compute,utility).
    pkgs+=("libcublas-$v" "libcurand-$v" "cuda-nvrtc-$v")
  fi
  apt_install "${pkgs[@]}"
  if ! id memex >/dev/null 2>&1; then
    if command -v useradd >/dev/null; then
      useradd --system --uid "$MEMEX_UID" --user-group --home-dir /home/memex --create-home \
        --shell /usr/sbin/nologin memex
    else
      echo "build.sh: no useradd to create the memex user" >&2; exit 1
    fi
  fi
  install -d -m 0755 /models
}

# Libraries the host driver provides inside a GPU container, never the image.
DRIVER_LIBS='^(libcuda\.so|libnvidia-ml\.so|libnvidia-ptxjitcompiler\.so)'

step_check() {
  local bin="$PREFIX/bin/memex"
  [[ -x "$bin" ]] || { echo "build.sh: $bin is missing: run the build step" >&2; exit 1; }
  local missing
  missing="$(ldd "$bin" | awk '/not found/ {print $1}' | grep -Ev "$DRIVER_LIBS" || true)"
  if [[ -n "$missing" ]]; then
    echo "build.sh: $bin needs libraries this system lacks:" >&2
    echo "$missing" >&2
    exit 1
  fi
  if ldd "$bin" | grep -q 'not found'; then
    say "links the GPU driver's libraries ($(ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')): not run here"
  else
    say "$("$bin" --version)"
  fi
  ldd "$bin" | awk '{print "   " $1}'
}

step_selftest() {
  local bin="$PREFIX/bin/memex" dir port pid rc
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' RETURN
  "$bin" tiny-model "$dir/model" >/dev/null
  port="${SELFTEST_PORT:-$((20000 + RANDOM % 10000))}"
  printf 'selftest-key\n' >"$dir/keys"
  say "selftest: MEMEX_MODEL=<tiny> MEMEX_HOST=127.0.0.1 MEMEX_PORT=$port memex serve"
  # The image's configuration: environment variables only. Auth stays on when the binary has
  # it: the health check needs no key.
  env MEMEX_MODEL="$dir/model" MEMEX_HOST=127.0.0.1 MEMEX_PORT="$port" \
    MEMEX_API_KEYS="$dir/keys" "$bin" serve >"$dir/log" 2>&1 &
  pid=$!
  local ok=0
  for _ in $(seq 1 600); do
    if MEMEX_PORT="$port" "$PREFIX/bin/memex-healthcheck" 2>/dev/null; then ok=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [[ $ok != 1 ]]; then
    echo "build.sh: selftest: the health check never passed; server log:" >&2
    tail -n 30 "$dir/log" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
  fi
  say "selftest: healthy; stopping with SIGTERM"
  kill -TERM "$pid"
  rc=0
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "build.sh: selftest: memex exited with $rc after SIGTERM; log:" >&2
    tail -n 30 "$dir/log" >&2
    exit 1
  fi
  say "selftest: passed"
}

for s in "${STEPS[@]}"; do
  case "$s" in
    build-deps) step_build_deps ;;
    build) step_build ;;
    runtime-deps) step_runtime_deps ;;
    check) step_check ;;
    selftest) step_selftest ;;
    *) echo "build.sh: unknown step $s" >&2; exit 2 ;;
  esac
done
