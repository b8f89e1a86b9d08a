#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks (its image has torch, transformers, peft,
# safetensors, accelerate, numpy, pillow, httpx, prometheus-client, scipy; Python 3.12) into .whl/,
# which the device call carries. Versions are this project's tested ones. About 12 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
  pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 annotated-doc==0.0.7 fastapi-offline==1.7.7 python-multipart==0.0.34 \
  open-clip-torch==3.3.0
du -sh .whl
