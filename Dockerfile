# GPU image: CUDA runtime, CUDA build of torch, the service as a non-root user.
#   docker build -t brand-image-service .
#   docker run --gpus all -p 8000:8000 -v $PWD/loras:/srv/app/loras -v hf-cache:/home/app/.cache brand-image-service
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app
WORKDIR /srv/app
RUN python3 -m venv /opt/venv && chown -R app:app /opt/venv /srv/app
ENV PATH=/opt/venv/bin:$PATH

USER app
# torch first, from the CUDA 12.8 wheel index, pinned to the version the tests run on (CPU there).
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app app ./app
COPY --chown=app:app bench ./bench
RUN pip install . && pip install --no-deps "open-clip-torch==3.3.0"

# A real SD 1.5 by default: a hub id (downloaded into the cache volume on first start) or a mounted
# diffusers folder (-e MODEL_ID=/models/sd15 -v /path/to/sd15:/models/sd15:ro). MODEL_ID=tiny runs the
# embedded test model.
ENV MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5 \
    DEVICE=cuda \
    DTYPE=auto \
    HOST=0.0.0.0 \
    PORT=8000 \
    LORA_BASE_DIR=/srv/app/loras \
    DATA_DIR=/srv/app/data \
    MODEL_CACHE_DIR=/srv/app/.cache/models
RUN mkdir -p /srv/app/loras /srv/app/data
VOLUME ["/srv/app/loras", "/srv/app/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

CMD ["brand-image-service"]
