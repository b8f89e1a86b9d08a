#!/usr/bin/env bash
# One command from a fresh clone to a running service on the embedded model, with demo brands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m app.demo
exec .venv/bin/uvicorn app.main:app --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
