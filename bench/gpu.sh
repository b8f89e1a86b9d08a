#!/usr/bin/env bash
# The GPU check, one device call of at most 8 minutes (sd15-random: full SD 1.5 shapes, random
# weights, built here first; 512x512, 20 steps, float16). Steps run in order of importance, each
# under its own timeout and all under one deadline, so the call always ends with what it measured:
#   1. pytest -m gpu (float16 LoRA vs diffusers, base restored exactly, batched = single images)
#   2. in-process rows, 20 requests each: base, one brand, round robin, Zipf, three composed, naive
#      diffusers; LoRA operations: cold load rank 8/64/128, switch with 1/50 resident, host-tier re-miss
#   3. the same with COMPILE_UNET: start-up compile time and recompilations during LoRA switches
#   4. over HTTP (uvicorn on the GPU): a Zipf mix from 8 client threads (images/s), batching rows
#      (8 clients; one brand / 8 brands; BATCH_MAX_SIZE 1, 4, 8), the cost of a cache miss
# Run here first: `bash bench/gpu_wheels.sh` (the GPU image lacks diffusers, fastapi, uvicorn,
# pydantic); then the device call carries `.whl` and runs `bash bench/gpu.sh`. JSON results and the
# log go to $OUT (the device tool's folder) when it is set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=$((START + ${GPU_BUDGET_S:-470}))
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR" bench/results
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# The compiled kernels and the model folder stay in .cache/models across the steps (and calls).
export MODEL_CACHE_DIR="$PWD/.cache/models"

step() {  # step NAME TIMEOUT_S COMMAND...: runs within the deadline, never past it
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (${left}s left of the budget)"; return; fi
  echo "== $name (up to ${limit}s, at +$((SECONDS - START))s)"
  timeout "$limit" "$@"
  local status=$?
  [ $status -eq 124 ] && echo "== $name: stopped at its ${limit}s limit"
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__, "diffusers",
diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  step "CUDA tests" 90 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  step "in-process rows (eager)" 150 "$PY" -m bench --preset sd15-random --device cuda --requests 20 --block 5 \
    --round-robin 3 --ops-ranks 8,64,128 --resident 1,50
  step "in-process rows (compiled)" 120 "$PY" -m bench --preset sd15-random --device cuda --compile --requests 20 \
    --block 10 --round-robin 3 --no-naive --ops-ranks 64 --resident 50
  step "HTTP Zipf mix, 8 clients" 75 "$PY" -m bench.http zipf --device cuda --preset sd15-random --size 512 \
    --steps 20 --clients 8 --requests 40 --warmup 8 --rank 8 --host-cache-mb 2048
  step "HTTP batching, 8 clients" 120 "$PY" -m bench.http batch --device cuda --preset sd15-random --size 512 \
    --steps 20 --clients 8 --requests 32 --rank 8 --batches 1,4,8
  step "HTTP cache miss, rank 64" 45 "$PY" -m bench.http miss --device cuda --requests 6
  echo "== done in $((SECONDS - START))s"
} 2>&1 | tee bench/results/gpu.log
cp bench/results/*.json bench/results/gpu.log "$OUT_DIR"/ 2>/dev/null || true
