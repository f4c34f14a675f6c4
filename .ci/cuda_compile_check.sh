#!/usr/bin/env bash
# Compile-only check of the CUDA code for sm_90, with the machine's nvcc and no
# GPU: the torch-free kernels in kernels/ first through CMakeLists.txt (the
# standalone library), then every .cu file on its own with -Wall; then the torch
# glue in csrc/cuda/ (below).
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
# The torch glue in csrc/cuda/ against the installed torch's headers, when they are
# there (a CPU torch ships the c10/cuda headers but not the generated
# cuda_cmake_macros.h, which holds one macro): compile only, nothing is linked.
# The torch is $PYTHON's: by default the checkout's .venv (where CI installs it),
# else python3 on PATH.
python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  if [ -x .venv/bin/python ]; then python_bin=.venv/bin/python; else python_bin=python3; fi
fi
torch_inc=$("$python_bin" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null || true)
py_inc=$("$python_bin" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null || true)
if [ -n "$torch_inc" ]; then
  mkdir -p "$build/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$build/inc/c10/cuda/impl/cuda_cmake_macros.h"
  inc_flags="-Ikernels -Icsrc/cuda -isystem $py_inc"
  for d in $torch_inc; do inc_flags="$inc_flags -isystem $d"; done
  for cu in csrc/cuda/*.cu; do
    "$real_nvcc" -std=c++17 -arch=sm_90 -O1 -DREXFAST_WITH_CUDA --expt-relaxed-constexpr -Xcompiler -fPIC \
      $inc_flags -I"$build/inc" -c "$cu" -o "$build/$(basename "$cu").glue.o"
    echo "compiled $cu (torch glue) for sm_90"
  done
else
  echo "torch not importable by $python_bin: skipped the csrc/cuda glue (set PYTHON to a python with torch)"
fi
