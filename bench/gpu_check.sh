#!/usr/bin/env bash
# GPU check on one CUDA machine (written for an H200; no network needed), in this order: install
# fedkern in place (builds the C++ core), print its backends and crossovers, run the GPU tests of
# every kernel family (bench/gpu_targets.py --test-files: robust, rowops, diffclip, clients,
# tamuna, sketch, manifolds, microadam, topk, randk, sparse; JUnit XML for the table), run
# `fedkern bench --full --device cuda`, measure the size crossovers (`fedkern bench --crossover`),
# profile a MicroAdam step, copy the results into bench/results/ and print LAST the targets of
# issue 16, each ok / MISS (bench/gpu_targets.py, from the JSON the benchmark wrote).
#
# Budget: under 8 minutes. Every step runs under `timeout` with its own limit, capped by what is
# left of GPU_CHECK_SECONDS (default 465 s, 8 minutes less the kill grace); the benchmark gets what
# the later steps do not reserve and stops starting new cases in time (the rest are listed as
# skipped). A failed step does not stop the script: it is reported and the exit status is 1.
#
# Usage: bash bench/gpu_check.sh
#   OUT=dir             write results there (default bench/results); with a separate OUT the step
#                       logs and the JUnit XML are packed into OUT/gpu-check-logs-<stamp>.tar.gz and
#                       OUT holds at most 7 files (the device tool brings back 8)
#   BENCH_FILTER=s,t    benchmark only the cases whose id contains one of the substrings
#   GPU_CHECK_SWEEP=1   also run bench/microadam_sweep.py (150 s; off by default)
#   GPU_CHECK_DRY=1     print every step with its limit and run none (what the CPU tests check)
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
TOTAL=${GPU_CHECK_SECONDS:-465}
DRY=${GPU_CHECK_DRY:-0}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT" bench/results
if [ "$(realpath "$OUT")" = "$(realpath bench/results)" ]; then
    SEPARATE=0
    LOGS=bench/results/logs
    mkdir -p "$LOGS"
else
    SEPARATE=1
    LOGS=$(mktemp -d)
fi
T0=$(date +%s)
FAILED=()
DONE=()

left() { echo $((TOTAL - ($(date +%s) - T0))); }

# step NAME LIMIT RESERVE CMD...: run CMD under timeout, LIMIT capped by what is left minus
# RESERVE (the seconds the later steps need); log to $LOGS/NAME-$STAMP.log
step() {
    local name=$1 limit=$2 reserve=$3 rc t
    shift 3
    local room=$(($(left) - reserve))
    ((limit > room)) && limit=$room
    if ((limit < 10)); then
        echo "== $name: skipped, no time left"
        FAILED+=("$name(no time)")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    if [ "$DRY" = 1 ]; then
        DONE+=("$name(dry)")
        return
    fi
    t=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name-$STAMP.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        echo "== $name: ok ($(($(date +%s) - t))s)"
        DONE+=("$name")
    else
        ((rc == 124 || rc == 137)) && rc="$rc, timed out"
        echo "== $name: FAILED (exit $rc, $(($(date +%s) - t))s)"
        FAILED+=("$name(exit $rc)")
    fi
}

# Reserves (s) of the steps after the benchmark: crossover 60, profile 35, summary 20.
step install 150 300 "$PY" -m pip install --no-build-isolation --no-deps -e .
step backends 30 290 "$PY" -c "import json, torch, fedkern; print(torch.__version__,
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA');
print(json.dumps(fedkern.backends(), indent=2)); print('crossovers:', fedkern.crossovers())"

# The GPU tests of every family; Triton JIT-compiles each kernel variant at first use, so spread
# them over workers when pytest-xdist is there. The CPU twin of the CUDA kernels (test_cuda_emu)
# ran in CI and is left out.
TEST_FILES=$("$PY" bench/gpu_targets.py --test-files)
XDIST=()
if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 6)
fi
# shellcheck disable=SC2086 # TEST_FILES is a list of paths without spaces
step gpu-tests 150 230 "$PY" -m pytest $TEST_FILES -q -p no:cacheprovider --maxfail=50 \
    -k "(cuda or triton) and not cuda_emu" --junitxml="$LOGS/gpu-tests.xml" "${XDIST[@]}"

# The benchmark: everything the later steps do not reserve; it stops starting cases 30 s before
# its limit. 10 repetitions a case (medians), the quick suite first, then the large sizes.
BENCH_LIMIT=$(($(left) - 115))
step bench "$BENCH_LIMIT" 115 "$PY" -m fedkern bench --full --device cuda --reps 10 --out "$OUT" \
    --max-seconds $((BENCH_LIMIT > 60 ? BENCH_LIMIT - 30 : 30)) \
    ${BENCH_FILTER:+--filter "$BENCH_FILTER"}
step crossover 60 55 "$PY" -m fedkern bench --crossover --device cuda --reps 5 --out "$OUT" \
    --max-seconds 45
step microadam-profile 35 20 "$PY" bench/profile_microadam.py
if [ "${GPU_CHECK_SWEEP:-0}" = 1 ]; then
    step microadam-sweep 150 20 "$PY" bench/microadam_sweep.py
fi

if ((SEPARATE)); then
    cp -f "$OUT"/cuda-*.json "$OUT"/cuda-*.md "$OUT"/cuda-*.png "$OUT"/latest-cuda.* \
        "$OUT"/crossover-cuda-* "$OUT"/latest-crossover-cuda.* bench/results/ 2>/dev/null || true
    mkdir -p bench/results/logs
    cp -f "$LOGS"/*.log bench/results/logs/ 2>/dev/null || true
    tar czf "$OUT/gpu-check-logs-$STAMP.tar.gz" -C "$LOGS" . 2>/dev/null || true
fi

echo
echo "== summary ($(($(date +%s) - T0))s of ${TOTAL}s)"
echo "steps done: ${DONE[*]:-none}"
if ((${#FAILED[@]})); then
    echo "FAILED steps: ${FAILED[*]}"
fi
timeout 20 "$PY" bench/gpu_targets.py "$OUT/latest-cuda.json" --tests "$LOGS/gpu-tests.xml" \
    --cases || [ "$DRY" = 1 ] || FAILED+=("table")

# latest-* repeat the time-stamped files: drop them from a separate OUT (the device tool brings
# back at most 8 files), after the table has read them.
if ((SEPARATE)); then
    rm -f "$OUT"/latest-cuda.* "$OUT"/latest-crossover-cuda.*
    rm -rf "$LOGS"
fi
((${#FAILED[@]} == 0))
