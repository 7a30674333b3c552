#!/usr/bin/env bash
# The whole GPU run in one call (shared/GPU.md, "One call, everything in it"):
#   1. install the project in place (builds csrc/ with its CUDA sources);
#   2. measure the ceilings: device-to-device copy bandwidth and bf16 8192^3 matmul TFLOP/s;
#   3. run the GPU tests (compiled Triton kernels: TRITON_INTERPRET=0);
#   4. run the benchmarks into $OUT/bench.json;
#   5. copy the results to bench/results/<date>-<gpu>.json (and $OUT) and print a short table.
# Optional comparators travel as wheels in .wheels/ (e.g. liger-kernel, pure Python):
#   pip download --no-deps -d .wheels liger-kernel   # on a machine with network; carry .wheels
# Usage (device tool): bash bench/gpu_check.sh        (writes under $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT" bench/results
export TRITON_INTERPRET=0
# lima_kernels is usable without the install (its own folder on the path), should the
# native build fail; the install's output is kept for the log.
export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1. install"
if compgen -G ".wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-deps --no-index .wheels/*.whl || echo "WARNING: carried wheels failed to install"
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "WARNING: editable install failed (see install.log); continuing with PYTHONPATH"; tail -20 "$OUT/install.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

echo "== 2. ceilings"
$PY bench/bench_ceilings.py | tee "$OUT/ceilings.json"

echo "== 3. GPU tests"
$PY -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -25
GPU_TESTS_RC=${PIPESTATUS[0]}

echo "== 4. benchmarks"
# -m "not slow" replaces pyproject's "not gpu and not slow": GPU-marked benchmarks run here.
$PY -m pytest bench/ -q -p no:cacheprovider -m "not slow" --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1
BENCH_RC=$?
grep -E "passed|failed|error" "$OUT/bench.log" | tail -3

echo "== 5. summary"
DATE=$(date +%Y-%m-%d)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
RESULT="${DATE}-${GPU}.json"
if [ -f "$OUT/bench.json" ]; then
    $PY bench/summarize.py "$OUT/bench.json" --copy-to "bench/results/$RESULT" --copy-to "$OUT/$RESULT"
else
    echo "no bench.json (benchmarks failed, see bench.log)"; tail -30 "$OUT/bench.log"
fi
echo "gpu tests rc=$GPU_TESTS_RC  bench rc=$BENCH_RC"
exit $(( GPU_TESTS_RC != 0 || BENCH_RC != 0 ))
