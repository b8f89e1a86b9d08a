#!/usr/bin/env bash
# GPU benchmark, one call on a lent H100 (about 4-5 minutes): sd15-random (full SD 1.5 architecture,
# random weights), 512x512, 20 steps, fp16. Prints the table (cached LoRA vs base, three composed vs
# base, Zipf, naive diffusers) and the LoRA operations (cold load rank 8/64/128, switch with 1 and 50
# resident adapters), then the same with torch.compile if time is left. JSON in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Building sd15-random (random init + save, ~1 min) happens once, in the cache folder.
timeout 200 "$PY" -m bench --preset sd15-random --device cuda --requests 6 --block 3 --round-robin 3 "$@"
status=$?
# torch.compile (COMPILE_UNET): compiling the UNet takes a minute or two; skipped if it does not finish.
timeout 100 "$PY" -m bench --preset sd15-random --device cuda --requests 4 --block 2 --round-robin 3 \
  --no-naive --ops-ranks 64 --resident 50 --compile "$@" || echo "torch.compile run did not finish (exit $?)"
exit $status
