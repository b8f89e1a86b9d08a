#!/usr/bin/env bash
# Build the Docker image with CPU torch on a local Debian base and check it end to end, offline:
# the embedded model (MODEL_ID=tiny, DEVICE=cpu), demo LoRAs mounted read-only, a data folder and a
# model-cache volume mounted, /health, /ready, one POST /generate with a brand LoRA, the HEALTHCHECK,
# and a clean exit (code 0) on `docker stop`.
#
#   bash scripts/docker-smoke.sh           # removes the built image afterwards (the base image stays)
#   bash scripts/docker-smoke.sh --keep    # keeps the built image (brand-image-service:smoke) and its build cache
#
# Needs: docker (a running daemon, or root and dockerd: then it starts one and stops it at the end),
# python3 on the host, and, the first time, root and debootstrap to make the base image
# (brand-image-service-base:bookworm, from Debian packages: no registry pull). The CPU torch wheel is
# taken from $TORCH_CPU_WHEEL, docker/wheels/ or /opt/wheels/, else downloaded from PyTorch's CPU index.
# Environment: SMOKE_IMAGE, SMOKE_BASE_IMAGE, DEBIAN_MIRROR, DOCKERD_ARGS, READY_TIMEOUT_S.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (use --keep)" >&2; exit 2 ;;
    esac
done

IMAGE=${SMOKE_IMAGE:-brand-image-service:smoke}
BASE_IMAGE=${SMOKE_BASE_IMAGE:-brand-image-service-base:bookworm}
TORCH_VERSION=2.13.0
WHEEL_NAME="torch-${TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"  # bookworm's python3 is 3.11
READY_TIMEOUT_S=${READY_TIMEOUT_S:-600}
NAME="brand-image-smoke-$$"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/docker-smoke.XXXXXX")
DOCKERD_PID=""
WHEEL_COPIED=""
CA_COPIED=""
IMAGE_BUILT=0
NEW_DANGLING=""
T0=$(date +%s)

log() { printf '[smoke %3ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if docker inspect "$NAME" >/dev/null 2>&1; then
        [ "$rc" -eq 0 ] || { log "container logs (last 40 lines):"; docker logs --tail 40 "$NAME" 2>&1; }
        docker rm -f "$NAME" >/dev/null 2>&1
    fi
    docker volume rm "$NAME-cache" >/dev/null 2>&1
    [ -z "$WHEEL_COPIED" ] || rm -f "$WHEEL_COPIED"
    [ -z "$CA_COPIED" ] || rm -f "$CA_COPIED"
    if [ "$KEEP" -eq 0 ] && [ "$IMAGE_BUILT" -eq 1 ]; then
        docker image rm "$IMAGE" >/dev/null 2>&1
        # The build stage's image (untagged) is what this build left besides the image itself.
        [ -z "$NEW_DANGLING" ] || docker image rm $NEW_DANGLING >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        [ "$rc" -eq 0 ] || { log "dockerd log (last 20 lines):"; tail -n 20 "$WORK/dockerd.log"; }
        kill "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
        log "stopped the dockerd this script started (pid $DOCKERD_PID)"
    fi
    rm -rf "$WORK"
    [ "$rc" -eq 0 ] && log "PASS" || log "failed (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v docker >/dev/null || die "docker is not installed (Debian: apt-get install docker.io)"
command -v python3 >/dev/null || die "python3 is needed on the host"

# -- a docker daemon ----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || die "no docker daemon answers and dockerd is not installed"
    [ "$(id -u)" -eq 0 ] || die "no docker daemon answers; start one (or run this as root to start it here)"
    # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
    dockerd ${DOCKERD_ARGS:---storage-driver=vfs --iptables=false --bridge=none} >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited: $(tail -n 5 "$WORK/dockerd.log")"
        sleep 1
    done
    docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
    log "started dockerd (pid $DOCKERD_PID)"
fi

# -- the base image: Debian bookworm from Debian packages ----------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE is there"
else
    [ "$(id -u)" -eq 0 ] || die "making $BASE_IMAGE needs root (debootstrap)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    log "making $BASE_IMAGE with debootstrap (minbase bookworm)"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed: $(tail -n 5 "$WORK/debootstrap.log")"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/cache/apt/*.bin "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    log "imported $BASE_IMAGE"
fi

# -- CPU torch for the build stage ---------------------------------------------------------------
if [ ! -f "docker/wheels/$WHEEL_NAME" ]; then
    src=${TORCH_CPU_WHEEL:-}
    [ -n "$src" ] || { [ ! -f "/opt/wheels/$WHEEL_NAME" ] || src="/opt/wheels/$WHEEL_NAME"; }
    if [ -z "$src" ]; then
        log "downloading $WHEEL_NAME from PyTorch's CPU index"
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 --index-url https://download.pytorch.org/whl/cpu \
            -d "$WORK/wheels" "torch==${TORCH_VERSION}+cpu"
        src="$WORK/wheels/$WHEEL_NAME"
    fi
    [ -f "$src" ] || die "no CPU torch wheel at $src"
    WHEEL_COPIED="docker/wheels/$WHEEL_NAME"
    ln -f "$src" "$WHEEL_COPIED" 2>/dev/null || cp "$src" "$WHEEL_COPIED"
fi

# pip in the build trusts what the host trusts (this matters behind a TLS-intercepting proxy).
HOST_CA=${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
CERT_ARG=()
if [ -f "$HOST_CA" ]; then
    CA_COPIED="docker/wheels/host-ca.crt"
    cp "$HOST_CA" "$CA_COPIED"
    CERT_ARG=(--build-arg PIP_CERT=/tmp/wheels/host-ca.crt)
fi

# -- build ---------------------------------------------------------------------------------------
dangling_before=$(docker images -q --filter dangling=true | sort -u)
log "building $IMAGE (BASE_IMAGE=$BASE_IMAGE, TORCH_WHEEL=$WHEEL_NAME)"
build_start=$(date +%s)
IMAGE_BUILT=1
if ! docker build --network host --force-rm --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_WHEEL="$WHEEL_NAME" \
    "${CERT_ARG[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    die "docker build failed"
fi
BUILD_S=$(($(date +%s) - build_start))
NEW_DANGLING=$(comm -13 <(echo "$dangling_before") <(docker images -q --filter dangling=true | sort -u) | tr '\n' ' ')
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "built in ${BUILD_S} s; image size ${IMAGE_BYTES} bytes ($((IMAGE_BYTES / 1000000)) MB)"

# -- demo LoRAs (read-only mount), data folder, model-cache volume -------------------------------
mkdir -p "$WORK/loras" "$WORK/data"
chmod 0777 "$WORK/data"  # the image's user (uid 1000) writes the A/B store here
if [ -x .venv/bin/python ]; then
    .venv/bin/python -m app.demo "$WORK/loras" >/dev/null
    log "demo LoRAs written with .venv"
else
    docker run --rm --network none --user "$(id -u):$(id -g)" -e HF_HOME=/tmp/hf \
        -v "$WORK/loras:/out" "$IMAGE" python -m app.demo /out >/dev/null
    log "demo LoRAs written by a throwaway container"
fi
[ -f "$WORK/loras/acme/style.safetensors" ] || die "no demo LoRA for acme"
chmod -R a+rX "$WORK/loras"  # LoRA files must be readable by the image's user (they are written 0600)
docker volume create "$NAME-cache" >/dev/null

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker run -d --name "$NAME" --network host --health-interval 2s --health-start-period 5s \
    -e HOST=127.0.0.1 -e PORT="$PORT" -e MODEL_ID=tiny -e DEVICE=cpu \
    -v "$WORK/loras:/srv/app/loras:ro" -v "$WORK/data:/srv/app/data" -v "$NAME-cache:/srv/app/.cache" \
    "$IMAGE" >/dev/null
log "container $NAME on 127.0.0.1:$PORT (loras read-only)"
RUN_START=$(date +%s)

# -- checks --------------------------------------------------------------------------------------
python3 - "$PORT" "$NAME" "$READY_TIMEOUT_S" <<'EOF'
import base64, json, subprocess, sys, time, urllib.error, urllib.request

port, name, ready_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
base = f"http://127.0.0.1:{port}"
t0 = time.monotonic()

def say(msg):
    print(f"    {time.monotonic() - t0:6.1f}s  {msg}", flush=True)

def running():
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
    return out.stdout.strip() == "true"

def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")

def wait_for(path, timeout):
    last = None
    while time.monotonic() - t0 < timeout:
        if not running():
            sys.exit(f"the container stopped while waiting for {path}")
        try:
            status, body = get(path)
            if status == 200:
                say(f"GET {path} -> 200 {json.dumps(body)}")
                return body
            if body != last:
                say(f"GET {path} -> {status} {json.dumps(body)}")
                last = body
            if isinstance(body, dict) and body.get("status") == "failed":
                sys.exit(f"{path}: {body}")
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    sys.exit(f"no 200 from {path} within {timeout:.0f} s")

wait_for("/health", 120)
wait_for("/ready", ready_timeout)
status, info = get("/")
say(f"GET / -> model {info['model']}, device {info['device']}, loras_found {info['loras_found']}")

request = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1,
           "brand_id": "acme"}
req = urllib.request.Request(base + "/generate", data=json.dumps(request).encode(),
                             headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    status, body = r.status, json.loads(r.read())
png = base64.b64decode(body.get("image") or "")
say(f"POST /generate -> {status}, PNG {len(png)} bytes, loras {json.dumps(body.get('loras'))}, "
    f"warnings {body.get('warnings')}, timings {body.get('timings')}")
assert status == 200, status
assert png.startswith(b"\x89PNG\r\n\x1a\n"), "the image is not a PNG"
assert body["loras"] and body["loras"][0]["brand_id"] == "acme", body["loras"]
assert body["warnings"] == [], body["warnings"]

while True:  # the image's HEALTHCHECK (run every 2 s here)
    health = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name],
                            capture_output=True, text=True).stdout.strip()
    if health == "healthy":
        say("HEALTHCHECK -> healthy")
        break
    if health == "unhealthy" or time.monotonic() - t0 > ready_timeout + 60:
        sys.exit(f"HEALTHCHECK: {health}")
    time.sleep(1)
EOF
READY_S=$(($(date +%s) - RUN_START))

uid=$(docker exec "$NAME" id -u)
[ "$uid" != 0 ] || die "the service runs as root"
log "the service runs as uid $uid; $(docker exec "$NAME" python -c 'import torch; print("torch", torch.__version__)')"
if docker logs "$NAME" 2>&1 | grep "not writable" >/dev/null; then log "read-only LoRA folder: warned, not fatal"; fi
docker exec "$NAME" test -f /srv/app/.cache/models/tiny-sd15-v1/model_index.json \
    || die "the embedded model was not saved in the model-cache volume"
log "embedded model saved in the model-cache volume"

stop_start=$(date +%s)
docker stop -t 30 "$NAME" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
log "docker stop: exit code $code after $(($(date +%s) - stop_start)) s"
docker logs --tail 4 "$NAME" 2>&1 | sed 's/^/    /'
[ "$code" -eq 0 ] || die "the service did not exit cleanly on SIGTERM (exit code $code)"

log "summary: build ${BUILD_S} s, image ${IMAGE_BYTES} bytes ($((IMAGE_BYTES / 1000000)) MB)," \
    "start to checks done ${READY_S} s, total $(($(date +%s) - T0)) s"
