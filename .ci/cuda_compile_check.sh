#!/usr/bin/env bash
# Compile-only check of the torch-free CUDA kernels in kernels/ for sm_90, with
# the machine's nvcc and no GPU: first through CMakeLists.txt (the standalone
# library), then every .cu file on its own with -Werror-like strictness.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_bin=$(command -v nvcc || true)
if [ -z "$nvcc_bin" ]; then
  echo "nvcc not found: cannot compile-check the CUDA kernels" >&2
  exit 1
fi
# The nvcc on PATH may be a wrapper script; CMake needs the real compiler.
real_nvcc=$(sed -n 's/^exec \(.*nvcc\) .*/\1/p' "$nvcc_bin" 2>/dev/null || true)
real_nvcc=${real_nvcc:-$nvcc_bin}
"$real_nvcc" --version | tail -1

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cmake -S . -B "$build" -DCMAKE_CUDA_COMPILER="$real_nvcc" -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release >"$build/configure.log" \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j 2
for cu in kernels/*.cu; do
  "$real_nvcc" -std=c++17 -arch=sm_90 -O3 -Ikernels -Xcompiler -Wall -c "$cu" -o "$build/$(basename "$cu").o"
  echo "compiled $cu for sm_90"
done
