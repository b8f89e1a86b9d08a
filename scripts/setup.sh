#!/usr/bin/env bash
# Create .venv (if missing) and install the service with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so that nothing below pulls another build. It comes from pip's configured index
# (PyPI's Linux build is the CUDA one, GBs of CUDA libraries), or from TORCH_INDEX_URL when set, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev,ray]"  # ray: the Ray Serve deployment and its tests
# Only for the real CLIP BPE vocabulary file of the embedded model; its own heavy deps are not needed.
.venv/bin/python -m pip install -q --no-deps "open-clip-torch==3.3.0"
