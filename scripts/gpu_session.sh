#!/usr/bin/env bash
# One GPU session's checks and timings, prepared to run as a whole on a lent GPU machine:
#
#   bash scripts/gpu_session.sh [OUT_DIR]        (default: results/gpu; needs `make venv` done)
#
# Each section has its own time limit and log; a failing section is recorded and the next runs.
# 1. make gpu-check: the FP8 path, decode kernels, CUDA graphs and moe_path=kernel against their
#    references (results/gpu_check.json).
# 2. make bench-slice: one Maverick layer of each kind at TP-8 shapes, % of HBM and tensor-core
#    peak, the whole-model projection (results/bench/slice.*).
# 3. The served setting against fp32 on the tiny model: scripts/bench_engine.py with bf16 + FP8
#    experts (moe_path reference, then kernel) and with fp32, the same workload.
# At the end OUT_DIR holds every log, the results above, and what the machine was (GPU, driver,
# torch, triton). The limits add up to 570 s: the whole session fits one 10-minute device command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu}
PY=.venv/bin/python
mkdir -p "$OUT"
status=0

section() {  # section NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok"
    else
        echo "   FAILED ($?): see $OUT/$name.log" | tee -a "$OUT/failures.txt"
        status=1
    fi
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1

BENCH=(scripts/bench_engine.py --concurrency 1,8 --num-requests 12 --wait-quiet 0)
section gpu-check 150 make gpu-check
section bench-slice 180 make bench-slice
section bench-fp32 80 $PY "${BENCH[@]}" --dtype float32 --experts dequant --out "$OUT/bench-fp32"
section bench-bf16-fp8 80 $PY "${BENCH[@]}" --dtype bfloat16 --experts fp8 --out "$OUT/bench-bf16-fp8"
section bench-bf16-fp8-kernel 80 $PY "${BENCH[@]}" --dtype bfloat16 --experts fp8 --moe-path kernel \
    --out "$OUT/bench-bf16-fp8-kernel"
cp -r results/gpu_check.json results/bench/slice.json results/bench/slice.md "$OUT"/ 2>/dev/null
exit $status
