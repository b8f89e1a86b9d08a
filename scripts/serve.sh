#!/usr/bin/env bash
# One command from a fresh clone to a running service on the embedded model, with demo brands.
# Settings (HOST, PORT, MODEL_ID, ...) come from the environment and .env, read by the app itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m app.demo
exec .venv/bin/brand-image-service
