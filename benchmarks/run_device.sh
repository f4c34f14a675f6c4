#!/usr/bin/env bash
# One call on a GPU machine (device tool): build, test, benchmark, summarise.
#   bash benchmarks/run_device.sh            # from the repo root
# The device has torch 2.11+cu130, triton 3.6, Python 3.12 and no network, so
# rexfast is installed without dependencies. Everything lands under $OUT
# (or ./device-out when $OUT is unset) and results under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

echo "== build (CUDA kernels for sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -e . --no-build-isolation --no-deps 2>&1 | tail -5 | tee "$OUT/build.txt" || status=1
python3 -m rexfast info | tee "$OUT/info.txt"

echo "== tests (all, GPU tests included)"
python3 -m pytest tests -x -q -m "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/tests_gpu.txt"

if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer on the CUDA parity tests"
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_group_assign_gpu.py -q -x -k cuda \
    -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/sanitizer.txt"
fi

echo "== benchmarks"
python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json" 2>&1 \
  | tee "$OUT/bench.txt" | tail -60
cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
python3 benchmarks/summarize.py benchmarks/results/*.json | tee "$OUT/summary.md"
exit $status
