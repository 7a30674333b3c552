#!/usr/bin/env bash
# The whole GPU run in one call (shared/GPU.md, "One call, everything in it"):
#   1. install the project in place (builds csrc/ with its CUDA sources);
#   2. measure the ceilings: device-to-device copy bandwidth and bf16 8192^3 matmul TFLOP/s;
#   3. run the GPU tests (compiled Triton kernels: TRITON_INTERPRET=0), among them the whole model on
#      the Triton path against the reference in fp32, bf16 autocast and bf16 parameters; then
#   3b. the default job in bf16 on the Triton kernels (the mode that once crashed at its first
#      backward), and the compile table of `python bench/aot.py` beside what this GPU runs;
#   4. run the benchmarks into $OUT/bench.json, and (4b) the FSDP step comparison (bench/fsdp_step.py);
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

echo "== 3b. bf16 training job on the Triton kernels; compile table"
$PY -m lima_core.train --config configs/tiny.toml --dtype bf16 --kernels triton --epochs 2 --max-new-tokens 32 \
    --out-dir "$OUT/runs" --name tiny-bf16 --plot false >"$OUT/train-bf16.log" 2>&1
TRAIN_RC=$?
tail -3 "$OUT/train-bf16.log"
env -u TRITON_INTERPRET $PY bench/aot.py --json "$OUT/aot.json" >"$OUT/aot.log" 2>&1
AOT_RC=$?
tail -4 "$OUT/aot.log"

echo "== 4. benchmarks"
# -m "not slow" replaces pyproject's "not gpu and not slow": GPU-marked benchmarks run here.
$PY -m pytest bench/ -q -p no:cacheprovider -m "not slow" --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1
BENCH_RC=$?
grep -E "passed|failed|error" "$OUT/bench.log" | tail -3

DATE=$(date +%Y-%m-%d)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')

echo "== 4b. FSDP step on one GPU (NCCL): lima-core FSDP vs no FSDP vs FSDP2, ~1B parameters"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 bench/fsdp_step.py "$OUT/fsdp_step.json" \
    >"$OUT/fsdp_step.log" 2>&1
FSDP_RC=$?
if [ -f "$OUT/fsdp_step.json" ]; then cat "$OUT/fsdp_step.json"; cp "$OUT/fsdp_step.json" "bench/results/${DATE}-${GPU}-fsdp-step.json"
else tail -20 "$OUT/fsdp_step.log"; fi

echo "== 5. summary"
RESULT="${DATE}-${GPU}.json"
if [ -f "$OUT/bench.json" ]; then
    $PY bench/summarize.py "$OUT/bench.json" --copy-to "bench/results/$RESULT" --copy-to "$OUT/$RESULT"
else
    echo "no bench.json (benchmarks failed, see bench.log)"; tail -30 "$OUT/bench.log"
fi
echo "gpu tests rc=$GPU_TESTS_RC  bf16 job rc=$TRAIN_RC  aot rc=$AOT_RC  bench rc=$BENCH_RC  fsdp step rc=$FSDP_RC"
exit $(( GPU_TESTS_RC != 0 || TRAIN_RC != 0 || AOT_RC != 0 || BENCH_RC != 0 || FSDP_RC != 0 ))
