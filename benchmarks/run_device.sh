#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU op tests, op benchmarks, then the
# whole-model rows if time is left. Made to fit the device tool's run with
# timeout_s=540 and to keep what it measured even if that call is killed.
#
#   bash benchmarks/run_device.sh             # on the GPU machine, from the repo root
#                                             # (device tool: run, timeout_s=540)
#   bash benchmarks/run_device.sh --dry-run   # anywhere: the same steps on CPU, in ~1-2 minutes
#   bash benchmarks/run_device.sh --list      # the test files and benchmark cases it runs
#
# The device image has python3 with torch 2.11+cu130, triton 3.6, nvcc, pytest-xdist,
# pytest-timeout and pytest-benchmark, no pycocotools and no network: rexfast is
# installed with --no-deps. Steps, in order of what the project lacks most:
#   1. build      pip install -e . (full log); rexfast._C must have its CUDA kernels,
#                 else the run FAILS (and step 2 fails too: REXFAST_REQUIRE_CUDA=1)
#   2. tests      tests/ops/test_*_gpu.py and test_*_triton.py on the GPU, per-test timeout,
#                 junit XML; a GPU backend that cannot run fails instead of skipping
#   3. op bench   group_assign, ms_deform_attn, region attention (CUDA, Triton, eager and
#                 torch.compile baselines) at the benchmark README's target shapes
#   4. sanitizer  compute-sanitizer memcheck over group_assign's GPU edge cases, if installed
#   5. models     CGFormer, then ReLA: B=8, 480², bf16 training step and inference, if time is left
#   6. more bench the README's other op shapes, in what time is left
# Each step runs under `timeout` with SIGINT first (pytest then writes its report, junit XML
# and rows), KILL 20 s later, and with a budget no larger than what is left of the call.
#
# $OUT (a fresh temporary folder when unset) gets at most 8 files, each written as the run
# goes, so a killed call still returns them:
#   summary.txt      the verdict, per-step status and times, environment, benchmark tables
#   build.log        the full build output and the extension check
#   tests.log        pytest's output for step 2 (failures and skips listed)
#   junit.xml        step 2 per test
#   rows.jsonl       every benchmark row, appended the moment it is measured
#   bench.log        pytest's output for steps 3 and 5
#   sanitizer.log    step 4
#   results.tar.gz   the rest, packed at the end: session-end result JSONs, pytest-benchmark
#                    JSON, pip list
#
# --dry-run: CUDA hidden (CUDA_VISIBLE_DEVICES=), Triton under its interpreter, pycocotools
# hidden (a shadow package that raises ImportError, as on the device image), the benchmarks at
# tiny shapes with torch.compile's eager backend (REXFAST_BENCH_DRY_RUN=1), the target cases
# and one other, and no rebuild (the extension of this checkout is checked instead). The
# GPU tests are collected and skip; two Triton tests run under the interpreter. It proves the
# plumbing (paths, node ids, timeouts, $OUT layout), not the numbers. .ci/run runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=device
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --list) MODE=list ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "run_device.sh: unknown argument '$1' (use --dry-run, --list or nothing)" >&2; exit 2 ;;
esac

# ----------------------------------------------------------------------------- what runs
TEST_FILES=(tests/ops/test_*_gpu.py tests/ops/test_*_triton.py)
SANITIZER_TESTS=tests/ops/test_group_assign_gpu.py
SANITIZER_K="edge_cases and group_assign"
# The benchmark README's target cases first: the deadline may cut the list short.
BENCH_FIRST=(
  "benchmarks/test_bench_group_assign.py::test_group_assign_cuda[B8N2P3600C512D512]"
  "benchmarks/test_bench_ms_deform_attn.py::test_ms_deform_attn_cuda[rela-torch.float32]"
  "benchmarks/test_bench_ms_deform_attn.py::test_ms_deform_attn_cuda[rela-torch.bfloat16]"
  "benchmarks/test_bench_region_attention.py::test_region_attention_cuda[ria-torch.bfloat16]"
  "benchmarks/test_bench_region_attention.py::test_region_attention_cuda[ria-torch.float32]"
  "benchmarks/test_bench_region_attention.py::test_region_attention_cuda[rla-torch.bfloat16]"
  "benchmarks/test_bench_region_attention.py::test_region_attention_cuda[rla-torch.float32]"
)
BENCH_REST=(
  "benchmarks/test_bench_ms_deform_attn.py::test_ms_deform_attn_cuda[uniform-torch.bfloat16]"
  "benchmarks/test_bench_ms_deform_attn.py::test_ms_deform_attn_cuda[uniform-torch.float32]"
)
for shape in B8N8P3600 B8N32P3600 B8N2P900 B8N2P14400 B8N8P900 B8N8P14400 B8N32P900 B8N32P14400; do
  BENCH_REST+=("benchmarks/test_bench_group_assign.py::test_group_assign_cuda[${shape}C512D512]")
done
MODELS=(
  "benchmarks/test_bench_cgformer.py::test_cgformer_cuda_released_b8_480_bf16"
  "benchmarks/test_bench_rela.py::test_rela_cuda_released_b8_480_bf16"
)

if [ "$MODE" = list ]; then
  printf 'tests %s\n' "${TEST_FILES[@]}"
  printf 'sanitizer %s -k %s\n' "$SANITIZER_TESTS" "$SANITIZER_K"
  printf 'bench %s\n' "${BENCH_FIRST[@]}" "${BENCH_REST[@]}"
  printf 'model %s\n' "${MODELS[@]}"
  exit 0
fi

# ----------------------------------------------------------------------------- set-up
START=$(date +%s)
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/rexfast-device-out.XXXXXX")
  echo "run_device.sh: OUT is unset; writing to $OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rexfast-device-work.XXXXXX")  # what goes into results.tar.gz
SUMMARY=$OUT/summary.txt
echo "RESULT: INCOMPLETE (the run was cut short; the lines below say how far it got)" >"$SUMMARY"
: >"$OUT/rows.jsonl"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export REXFAST_BENCH_ROWS=$OUT/rows.jsonl
rm -rf benchmarks/.results  # the session-end JSONs of this run only

if [ "$MODE" = dry ]; then
  # Hang guards, not the expectation: the dry run needs ~80 s of CPU time (about 1.5 minutes on
  # two idle cores), but a CI machine shared with other work can be 4× slower.
  BUDGET=${REXFAST_DEVICE_BUDGET:-480}
  CAP_BUILD=0; CAP_TESTS=100; CAP_BENCH=160; CAP_SANITIZER=60; CAP_MODELS=150; CAP_MORE=60
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 REXFAST_BENCH_DRY_RUN=1
  mkdir -p "$WORK/shadow/pycocotools"
  echo 'raise ImportError("pycocotools is hidden by run_device.sh --dry-run (the GPU image has none)")' \
    >"$WORK/shadow/pycocotools/__init__.py"
  export PYTHONPATH="$WORK/shadow:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  TEST_K=(-k "gpu or forced_several_tiles_per_program_half")  # GPU tests collect and skip; 2 run
  BENCH_MORE=("${BENCH_REST[0]}")  # one, to exercise the step
  XDIST=()
else
  BUDGET=${REXFAST_DEVICE_BUDGET:-500}  # of the call's 540 s: 40 s for start-up jitter and copying back
  CAP_BUILD=210; CAP_TESTS=170; CAP_BENCH=150; CAP_SANITIZER=60; CAP_MODELS=150; CAP_MORE=500
  unset TRITON_INTERPRET
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export REXFAST_REQUIRE_CUDA=1 REXFAST_BENCH_MODEL_COMPILE=0
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  TEST_K=()
  BENCH_MORE=("${BENCH_REST[@]}")
  # Triton compiles each kernel specialisation once per process: few workers, whole files each
  # 8 workers: Triton's compile of each kernel specialisation is the time; its cache is shared on disk
  XDIST=(-n 8)
  $PY -c "import xdist" 2>/dev/null || XDIST=()
fi
TIMEOUT=(--timeout 120)  # per test (pytest-timeout, on the device image; CI's venv may lack it)
$PY -c "import pytest_timeout" 2>/dev/null || TIMEOUT=()
DEADLINE=$((START + BUDGET))
RESERVE=15  # kept for the summary and the tar at the end
FAILED=()

note() { echo "$*" | tee -a "$SUMMARY"; }
# A step that ran out of its share of time or was skipped for lack of time is not a failure on
# the GPU (the list is longest first-cut-last), but it is in a dry run, which must complete.
bench_ok() {
  [ "$STEP_RC" = 0 ] && return 0
  [ "$MODE" = device ] && { [ "$STEP_RC" = 124 ] || [ "$STEP_RC" = skipped ]; }
}
left() { echo $((DEADLINE - RESERVE - $(date +%s))); }

# run_step NAME CAP LOG CMD...: CMD under `timeout`, SIGINT at min(CAP, time left), KILL 20 s
# later; appends its output to LOG and one status line to the summary. Sets STEP_RC.
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local budget; budget=$(left)
  ((cap < budget)) && budget=$cap
  STEP_RC=
  if ((budget < 10)); then
    note "$(printf '%-10s SKIPPED: %ss of the call left' "$name" "$(left)")"
    STEP_RC=skipped
    return
  fi
  local t0; t0=$(date +%s)
  export REXFAST_BENCH_DEADLINE=$((t0 + budget * 80 / 100))  # no new benchmark case after 80%
  local skip; skip=$(($(cat "$log" 2>/dev/null | wc -l) + 1))  # the summary line is read from this step's lines
  echo "== $name (budget ${budget}s): $*" | tee -a "$log"
  timeout -s INT -k 20 "$budget" "$@" >>"$log" 2>&1
  STEP_RC=$?
  local took=$(($(date +%s) - t0)) what=ok
  case $STEP_RC in
    0) ;;
    124|137) what="TIMED OUT (stopped at ${budget}s)" ;;
    *) what="FAILED (exit $STEP_RC)" ;;
  esac
  note "$(printf '%-10s %-28s %4ss  %s' "$name" "$what" "$took" "$(tail -n +"$skip" "$log" | grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' | tail -1 | tr -d '=' | sed 's/^ *//')")"
}

# ----------------------------------------------------------------------------- 0. environment
{
  echo "rexfast device run ($MODE), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '-dirty')"
  echo "budget ${BUDGET}s; OUT=$OUT"
  if command -v nvidia-smi >/dev/null && [ "$MODE" = device ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  fi
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -1)"
  echo
} >>"$SUMMARY" 2>&1
cat "$SUMMARY"

# ----------------------------------------------------------------------------- 1. build
if [ "$MODE" = device ]; then
  run_step build "$CAP_BUILD" "$OUT/build.log" $PY -m pip install -v -e . --no-build-isolation --no-deps
  [ "$STEP_RC" = 0 ] || FAILED+=(build)
  note "           $(grep -m1 -o 'rexfast: CUDA kernels.*' "$OUT/build.log" || echo 'setup.py did not say whether it built the CUDA kernels')"
else
  echo "dry run: no rebuild (CI's install step built this checkout's extension); checking it" >"$OUT/build.log"
fi
REQUIRE=(); [ "$MODE" = device ] && REQUIRE=(--require-cuda)
run_step check 30 "$OUT/build.log" $PY benchmarks/check_extension.py "${REQUIRE[@]}"
if [ "$STEP_RC" != 0 ]; then
  FAILED+=(extension)
  note "           !!! rexfast._C has no CUDA kernels: CUDA rows and tests below cannot be trusted"
fi

# ----------------------------------------------------------------------------- 2. GPU tests
run_step tests "$CAP_TESTS" "$OUT/tests.log" $PY -m pytest "${TEST_FILES[@]}" "${TEST_K[@]}" "${XDIST[@]}" \
  -q -rfEs -p no:cacheprovider "${TIMEOUT[@]}" --junitxml "$OUT/junit.xml"
[ "$STEP_RC" = 0 ] || FAILED+=(tests)

# ----------------------------------------------------------------------------- 3. op benchmarks
run_step op-bench "$CAP_BENCH" "$OUT/bench.log" $PY -m pytest "${BENCH_FIRST[@]}" -q -rs -p no:cacheprovider \
  --benchmark-json "$WORK/pytest-benchmark-ops.json"
bench_ok || FAILED+=(op-bench)

# ----------------------------------------------------------------------------- 4. sanitizer
# memcheck on the CUDA/Triton kernels of group_assign's edge cases (NaN, inf, ties, B=0).
# In a dry run there is neither GPU nor compute-sanitizer: the same pytest command runs bare
# and must select tests (they skip), which proves the path and the -k expression.
SAN=()
if [ "$MODE" = device ]; then
  if command -v compute-sanitizer >/dev/null; then
    SAN=(compute-sanitizer --tool memcheck --error-exitcode 9)
  else
    note "sanitizer  SKIPPED: compute-sanitizer not found"
  fi
fi
if [ "$MODE" = dry ] || ((${#SAN[@]})); then
  run_step sanitizer "$CAP_SANITIZER" "$OUT/sanitizer.log" "${SAN[@]}" $PY -m pytest "$SANITIZER_TESTS" \
    -k "$SANITIZER_K" -q -rfEs -p no:cacheprovider "${TIMEOUT[@]}"
  bench_ok || FAILED+=(sanitizer)
fi

# ----------------------------------------------------------------------------- 5. whole models
run_step models "$CAP_MODELS" "$OUT/bench.log" $PY -m pytest "${MODELS[@]}" -q -rs -p no:cacheprovider \
  --benchmark-json "$WORK/pytest-benchmark-models.json"
bench_ok || FAILED+=(models)

# ----------------------------------------------------------------------------- 6. the other op shapes
run_step more-bench "$CAP_MORE" "$OUT/bench.log" $PY -m pytest "${BENCH_MORE[@]}" -q -rs -p no:cacheprovider \
  --benchmark-json "$WORK/pytest-benchmark-more.json"
bench_ok || FAILED+=(more-bench)

# ----------------------------------------------------------------------------- summary, the rest
{
  echo
  $PY benchmarks/summarize.py --brief "$OUT/rows.jsonl" 2>&1
  echo
  echo "elapsed $(($(date +%s) - START))s of ${BUDGET}s"
} >>"$SUMMARY"
cp -r benchmarks/.results "$WORK/results" 2>/dev/null
$PY -m pip list --format=freeze >"$WORK/pip-list.txt" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude=shadow . 2>/dev/null
rm -rf "$WORK"

if ((${#FAILED[@]})); then
  VERDICT="FAILED: ${FAILED[*]}"
else
  VERDICT="OK"
fi
# The layout the device tool returns: at most 8 files. A dry run must also have made each one,
# and rows for every op benchmark it ran (a case that ran past the deadline is skipped, not lost).
n=$(find "$OUT" -type f | wc -l)
if ((n > 8)); then
  VERDICT="FAILED: $n files in $OUT (the device tool returns 8)"
fi
if [ "$MODE" = dry ]; then
  for f in summary.txt build.log tests.log junit.xml rows.jsonl bench.log sanitizer.log results.tar.gz; do
    [ -s "$OUT/$f" ] || VERDICT="FAILED: the dry run made no $f"
  done
  grep -q '"row"' "$OUT/rows.jsonl" || VERDICT="FAILED: the dry run recorded no benchmark row"
fi
body=$(tail -n +2 "$SUMMARY")
printf 'RESULT: %s\n%s\n' "$VERDICT" "$body" >"$SUMMARY"
echo
cat "$SUMMARY"
[ "$VERDICT" = OK ]
