# The service image. Default: a GPU image on python:3.11-slim-bookworm with torch's CUDA 12.8 wheels
# (they bundle the CUDA libraries; the host needs only the NVIDIA driver and container toolkit).
#   docker build -t brand-image-service .
#   docker run --gpus all -p 8000:8000 -v $PWD/loras:/srv/app/loras:ro -v $PWD/data:/srv/app/data \
#     -v model-cache:/srv/app/.cache brand-image-service
# Build arguments:
#   BASE_IMAGE       any Debian/Ubuntu image; python3 (+ venv) is installed with apt when it lacks one
#   TORCH_VERSION    the torch release (the tests run on 2.13.0)
#   TORCH_INDEX_URL  where torch comes from (cu128 by default; .../whl/cpu for a CPU image)
#   TORCH_WHEEL      a wheel file in docker/wheels/ to install instead of the index (offline CPU builds,
#                    scripts/docker-smoke.sh)
#   PIP_CERT         a CA bundle for pip behind a TLS-intercepting proxy, put in docker/wheels/:
#                    --build-arg PIP_CERT=/tmp/wheels/ca.crt (pip reads it from the environment)
#   APP_UID, APP_GID the ids the service runs as (a user is created unless one has that uid already)
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python:*-slim has python3 and venv; a bare Debian/Ubuntu (or CUDA runtime) image gets them from apt.
RUN if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_WHEEL=
ARG PIP_CERT=
# Only the build stage sees these wheels: the final image copies the finished venv, not them.
COPY docker/wheels/ /tmp/wheels/
# torch first, alone: any later "torch>=..." requirement is then already met (no second, CPU/CUDA torch).
RUN if [ -n "$TORCH_WHEEL" ]; then \
        pip install "/tmp/wheels/$TORCH_WHEEL"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    fi
WORKDIR /src
# The dependencies in their own layer, from pyproject.toml alone (an empty package stands in for the
# code), so editing the code or the README does not reinstall them. open-clip-torch only for the CLIP
# BPE vocabulary file of the embedded model (MODEL_ID=tiny), without its dependencies.
COPY pyproject.toml ./
RUN mkdir -p app bench && touch README.md app/__init__.py bench/__init__.py \
    && pip install . && pip uninstall -y brand-image-service \
    && pip install --no-deps "open-clip-torch==3.3.0" \
    && rm -rf app bench README.md build ./*.egg-info
COPY README.md ./
COPY app ./app
COPY bench ./bench
RUN pip install --no-deps . \
    && python -c "import torch, diffusers, app.main; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

FROM base
ARG APP_UID=1000
ARG APP_GID=1000
# A real SD 1.5 by default: a hub id (downloaded into the cache volume on first start) or a mounted
# diffusers folder (-e MODEL_ID=/models/sd15 -v /path/to/sd15:/models/sd15:ro). MODEL_ID=tiny runs the
# embedded test model (and DEVICE=cpu runs without a GPU).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/srv/app \
    MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5 \
    DEVICE=cuda \
    DTYPE=auto \
    HOST=0.0.0.0 \
    PORT=8000 \
    LORA_BASE_DIR=/srv/app/loras \
    DATA_DIR=/srv/app/data \
    HF_HOME=/srv/app/.cache/huggingface \
    MODEL_CACHE_DIR=/srv/app/.cache/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Some bases already have an account with uid 1000 (ubuntu:24.04 and CUDA images: "ubuntu"); reuse it then.
# The folders belong to the service's user, so a named volume mounted on /srv/app/.cache starts writable.
RUN if ! getent group "$APP_GID" >/dev/null; then groupadd --gid "$APP_GID" app; fi \
    && if ! getent passwd "$APP_UID" >/dev/null; then \
        useradd --uid "$APP_UID" --gid "$APP_GID" --home-dir /srv/app --no-create-home --shell /usr/sbin/nologin app; \
    fi \
    && mkdir -p /srv/app/loras /srv/app/data /srv/app/.cache/huggingface /srv/app/.cache/models \
    && chown -R "$APP_UID:$APP_GID" /srv/app
WORKDIR /srv/app
# Mount a named volume on /srv/app/.cache to keep downloaded models (HF_HOME and MODEL_CACHE_DIR) across
# containers; it is not a VOLUME here, so a run without it leaves no anonymous multi-GB volume behind.
VOLUME ["/srv/app/loras", "/srv/app/data"]
EXPOSE 8000
USER ${APP_UID}:${APP_GID}
# /health: the process answers (the model may still be loading; /ready says when it can generate).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; u = 'http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'); sys.exit(urllib.request.urlopen(u, timeout=4).status != 200)"]
CMD ["brand-image-service"]
# Last: the big layer, so the steps above stay cached and cheap.
COPY --from=build /opt/venv /opt/venv
