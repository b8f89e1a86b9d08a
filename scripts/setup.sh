#!/usr/bin/env bash
# Create .venv (if missing) and install the service with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first, pinned: any other torch requirement would pull GBs of CUDA builds.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,ray]"  # ray: the Ray Serve deployment and its tests
# Only for the real CLIP BPE vocabulary file of the embedded model; its own heavy deps are not needed.
.venv/bin/python -m pip install -q --no-deps "open-clip-torch==3.3.0"
