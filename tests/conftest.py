"""Shared fixtures: the embedded model, a real engine, diffusers' own pipeline, LoRA files, app clients.

Everything runs on the CPU at 64x64 with 2 denoising steps. The expensive pieces (the model folder,
the engine, the diffusers reference pipeline) are built once per session and reused; tests that need
exact cache counters build their own app (about 2 s each).
"""

# ruff: noqa: E402  (OMP_NUM_THREADS must be set before torch is imported)
from __future__ import annotations

import os

# One intra-op thread, set before torch is imported (and inherited by the server subprocess): these
# models are tiny, and on a busy 2-core machine two OpenMP threads per process spend most of their
# time waiting for each other (measured: 0.4 s vs 4 s per image). Override with OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import base64
import hashlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from app.config import PROJECT_ROOT, Settings
from app.engine.embedded import UNET_CONFIG, embedded_model_path
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora

# The suite must not depend on the developer's `.env` or exported settings (the README tells users to
# make one): every test states the settings it needs. Server subprocesses also run in a temp folder.
Settings.model_config["env_file"] = None
for _name in Settings.model_fields:
    os.environ.pop(_name.upper(), None)

# The smallest request the API accepts; fast on two CPU cores.
SIZE = 64
STEPS = 2
PROMPT = "a red coffee cup on a wooden table"
GUIDANCE = 7.5
READY_TIMEOUT_S = 120


def small_request(**fields) -> dict:
    """A /generate body at the test size; fields override or add."""
    return {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 7, **fields}


def generate(client, **fields) -> dict:
    """POST /generate with `small_request(**fields)`; the reply's JSON, which must be a 200."""
    response = client.post("/generate", json=small_request(**fields))
    assert response.status_code == 200, response.text
    return response.json()


def decode_png(image_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    image.load()
    return image


def png_bytes(image_b64: str) -> bytes:
    return base64.b64decode(image_b64)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def count_reader_hashes(monkeypatch) -> list[int]:
    """Record the size of every buffer the service's LoRA reader hashes (it hashes the bytes it read)."""
    from app.engine import lora_weights

    sizes: list[int] = []

    def sha256(data):
        sizes.append(len(data))
        return hashlib.sha256(data)

    monkeypatch.setattr(lora_weights, "hashlib", SimpleNamespace(sha256=sha256))
    return sizes


# ---- the model -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The project's model cache (`.cache/models`): the embedded model is built there once and reused.

    Building takes several seconds; the folder name carries EMBEDDED_MODEL_VERSION and is written
    atomically, so reusing it across runs is safe.
    """
    return Path(Settings.model_fields["model_cache_dir"].default)


@pytest.fixture(scope="session")
def model_dir(model_cache_dir: Path) -> Path:
    return embedded_model_path(model_cache_dir)


def test_settings(model_cache_dir: Path, lora_dir: Path, **overrides) -> Settings:
    fields = dict(device="cpu", dtype="float32", log_level="warning", lora_preload_brands="")
    return Settings(model_cache_dir=model_cache_dir, lora_base_dir=lora_dir, **{**fields, **overrides})


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def engine(model_cache_dir: Path, model_dir: Path, tmp_path_factory):
    """One real DiffusionEngine for the session. Tests pass their adapters to each generate call."""
    from app.engine.diffusion import DiffusionEngine

    return DiffusionEngine(test_settings(model_cache_dir, tmp_path_factory.mktemp("engine-loras")))


def load_reference_pipe(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_pipe(model_dir: Path):
    """diffusers' own StableDiffusionPipeline on the same folder, never given a LoRA (for base comparisons)."""
    return load_reference_pipe(model_dir)


@pytest.fixture
def reference(model_dir: Path):
    """A fresh diffusers pipeline a test may load LoRAs into (under a second to load).

    Fresh rather than unloaded after each test: unfusing in float32 does not give the base weights
    back bit for bit, and a reference must never carry another test's state.
    """
    return load_reference_pipe(model_dir)


def reference_image(
    pipe, seed: int, output_type: str = "np", prompt: str = PROMPT, size: int = SIZE, guidance: float = GUIDANCE
):
    with torch.inference_mode():
        return pipe(
            prompt=prompt,
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
        ).images[0]


def render(engine, spec, adapters=(), output_type: str = "np"):
    """The engine's image for one job (a float array in 0..1 unless `output_type` says otherwise)."""
    from app.jobs import GenerationJob

    return engine.generate(GenerationJob(spec, tuple(adapters)), output_type=output_type).image


def spec(seed: int = 7, prompt: str = PROMPT, size: int = SIZE, guidance: float = GUIDANCE):
    from app.jobs import GenerationSpec

    return GenerationSpec(
        prompt=prompt,
        negative_prompt=None,
        width=size,
        height=size,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        seed=seed,
    )


# ---- LoRA files ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_modules(model_dir: Path):
    """Pristine UNet and text encoder (never merged into) whose shapes and scales the LoRA files follow."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder")
    return unet, text_encoder


LoraFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_lora(base_modules) -> LoraFactory:
    """Write a real LoRA file for the embedded model; same arguments -> same bytes.

    key_format "peft" or "kohya"; text_encoder adds CLIP attention layers; convolutions adds the
    UNet resnet 3x3 convs; alpha (kohya) differs from the rank to exercise the scale.
    """
    unet, text_encoder = base_modules

    def write(
        path: Path,
        key_format: str = "peft",
        text_encoder_layers: bool = True,
        convolutions: bool = False,
        rank: int = 4,
        alpha: float | None = None,
        seed: int = 0,
        strength: float = 2.0,
    ) -> Path:
        layers = target_layers(
            unet, text_encoder, feed_forward=True, convolutions=convolutions, with_text_encoder=text_encoder_layers
        )
        state = random_lora_state_dict(
            layers, rank=rank, alpha=alpha, key_format=key_format, seed=seed, strength=strength
        )
        return write_lora(Path(path), state)

    return write


@pytest.fixture(scope="session")
def make_brand(make_lora) -> Callable[..., Path]:
    """Write `<root>/<brand>/style.safetensors` (or `<root>/<brand>/<version>/...`); returns the file."""

    def write(root: Path, brand: str, version: str | None = None, **lora_args) -> Path:
        folder = Path(root) / brand / (version or "")
        return make_lora(folder / "style.safetensors", **lora_args)

    return write


@pytest.fixture(scope="session")
def make_foreign_lora(tmp_path_factory) -> LoraFactory:
    """Write a LoRA made for a wider UNet with SDXL's 2048-wide cross-attention: it cannot fit."""
    from diffusers import UNet2DConditionModel

    config = {**UNET_CONFIG, "cross_attention_dim": 2048, "block_out_channels": (64, 128, 128, 128)}
    torch.manual_seed(0)
    wide_unet = UNet2DConditionModel(**config)

    def write(path: Path, key_format: str = "peft") -> Path:
        layers = target_layers(wide_unet, None, with_text_encoder=False)
        return write_lora(Path(path), random_lora_state_dict(layers, rank=4, key_format=key_format, seed=5))

    return write


# ---- expected images -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def expected_png(engine) -> Callable[..., bytes]:
    """The PNG the service must return for (LoRA file or None, weight, seed), rendered by the session engine.

    Results are memoised by the file's sha256, so files with the same bytes share one rendering.
    """
    from app.infotext import build_infotext, prompt_with_lora_tags
    from app.jobs import ActiveAdapter
    from app.service import encode_png

    rendered: dict[tuple, bytes] = {}

    def expected(lora_path: Path | None = None, weight: float = 0.8, seed: int = 7) -> bytes:
        digest = sha256_of(lora_path) if lora_path is not None else None
        brand = lora_brand(lora_path) if lora_path is not None else None
        key = (digest, lora_path and lora_tag_name(lora_path), weight if digest else None, seed)
        if key not in rendered:
            adapters = []
            if lora_path is not None:
                adapters = [ActiveAdapter(f"expected-{digest[:16]}", engine.load_adapter(Path(lora_path)), weight)]
            # The service writes A1111's infotext into every PNG (MODEL_ID=tiny, the model's own PNDM), the
            # request's LoRA as a tag after the prompt.
            applied = digest is not None and weight != 0.0
            infotext = build_infotext(
                prompt=prompt_with_lora_tags(PROMPT, [(lora_tag_name(lora_path), weight)] if applied else []),
                negative_prompt=None, steps=STEPS, scheduler="pndm", guidance_scale=GUIDANCE,
                seed=seed, width=SIZE, height=SIZE, model_id="tiny",
                loras=[(brand, digest)] if applied else [],
            )  # fmt: skip
            rendered[key] = encode_png(render(engine, spec(seed), adapters, output_type="pil"), infotext)
        return rendered[key]

    return expected


def lora_tag_name(path: Path) -> str:
    """The infotext's tag NAME for `<root>/<brand>/[vN/]file.safetensors`: `brand@vN` or `brand`."""
    parent = Path(path).parent
    return f"{parent.parent.name}@{parent.name}" if re.fullmatch(r"v\d+", parent.name) else parent.name


def lora_brand(path: Path) -> str:
    """The brand of `<root>/<brand>/[vN/]file.safetensors` (for the infotext's Lora hashes)."""
    parent = Path(path).parent
    return parent.parent.name if re.fullmatch(r"v\d+", parent.name) else parent.name


# ---- the app -------------------------------------------------------------------------------------


@pytest.fixture
def lora_root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def make_client(model_cache_dir: Path, model_dir: Path) -> Callable[..., AbstractContextManager]:
    """`with make_client(lora_dir, **settings) as c:` a TestClient whose lifespan ran and whose model is ready."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    @contextmanager
    def client(lora_dir: Path, **overrides) -> Iterator[TestClient]:
        app = create_app(test_settings(model_cache_dir, lora_dir, **overrides))
        with TestClient(app) as c:
            state = app.state.service_state
            assert state.wait_ready(READY_TIMEOUT_S), f"the app did not become ready: {state.load_error}"
            yield c

    return client


@pytest.fixture
def client(make_client, lora_root: Path):
    with make_client(lora_root) as c:
        yield c


# ---- float32 accuracy against diffusers ----------------------------------------------------------

# How far our float32 image may be from diffusers' float64 result, as a multiple of how far diffusers'
# own float32 result is from it. Both are float32 evaluations of the same function; which one rounds
# closer varies with the CPU's kernels (measured here: ours 1.25x diffusers' at CFG 7.5, 1.2x at 1.0),
# so a bound on the raw difference between the two cannot hold on every machine. A wrong scale, a
# missing layer or a wrong key is 100x further off (VISIBLE_CHANGE-sized, ~1e-2 against ~5e-5).
FLOAT32_ERROR_RATIO = 2.0
# The smallest error worth comparing: one float32 step just below 1.0 (images are 0..1).
FLOAT32_STEP = float(np.spacing(np.float32(0.5)))


def diffusers_reference(
    model_dir: Path,
    loras: list[tuple[Path, float]],
    seed: int,
    guidance: float = GUIDANCE,
    dtype=torch.float32,
    prompt: str = PROMPT,
    size: int = SIZE,
) -> np.ndarray:
    """diffusers' own image for these LoRAs (`load_lora_weights` + `set_adapters`), in `dtype`.

    The initial noise is drawn in float32 from the seeded CPU generator, as the service draws it, and
    then cast, so a float64 run starts from the same latents.
    """
    from diffusers.utils.torch_utils import randn_tensor

    pipe = load_reference_pipe(model_dir).to(dtype=dtype)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], [weight for _, weight in loras])
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    # diffusers' unfused PEFT layers run many tiny ops; single-threaded they are 10x faster on a busy
    # 2-core machine (threads only reorder float sums).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return pipe(
                prompt=prompt,
                width=size,
                height=size,
                num_inference_steps=STEPS,
                guidance_scale=guidance,
                latents=latents.to(dtype),
                output_type="np",
            ).images[0]
    finally:
        torch.set_num_threads(threads)


def assert_as_accurate_as_diffusers(ours: np.ndarray, model_dir: Path, loras, seed: int, guidance: float) -> None:
    """Our float32 image is as close to diffusers' float64 result as diffusers' own float32 image is."""
    theirs = diffusers_reference(model_dir, loras, seed, guidance)
    exact = diffusers_reference(model_dir, loras, seed, guidance, dtype=torch.float64)
    ours_error = float(np.abs(ours - exact).max())
    their_error = float(np.abs(theirs - exact).max())
    assert ours_error <= FLOAT32_ERROR_RATIO * max(their_error, FLOAT32_STEP), (
        f"max error vs float64: ours {ours_error:.3g}, diffusers' float32 {their_error:.3g}"
    )


# ---- a real server -------------------------------------------------------------------------------


HANG_GUARD_S = 180  # what a wait_for waits at most: a guard against a hang, never a timer the test relies on


def wait_for(check: Callable, what: str, timeout_s: float = HANG_GUARD_S):
    """Poll `check()` until it returns something truthy, and return that; the deadline only guards against
    a hang (every wait ends on a state)."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
    return value


def job_events(client, job_id: str) -> Iterator[tuple[str, dict]]:
    """A job's Server-Sent Events from `client` (an httpx client of the service) as (name, data) pairs,
    until the server closes the stream."""
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=HANG_GUARD_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield name, json.loads(line.removeprefix("data: "))


@contextmanager
def ray_app(settings: Settings, app_name: str, num_cpus: int) -> Iterator:
    """The Ray Serve application of `settings` on a local Ray instance and a free loopback port: an httpx
    client of its ingress, once /ready answers 200. Ray and Serve are shut down afterwards."""
    import httpx
    import ray
    from ray import serve

    from app.serve.deployment import build_app

    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, app_name), name=app_name, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HANG_GUARD_S) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, "the Ray app to be ready")
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m uvicorn app.main:app` in a subprocess, in its own folder (so no project `.env` is read)."""

    def __init__(self, work_dir: Path, env: dict[str, str], ready_timeout_s: float = 180):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work_dir / "server.log"
        defaults = {
            "MODEL_CACHE_DIR": str(Settings.model_fields["model_cache_dir"].default),
            "LORA_BASE_DIR": str(self.work_dir / "loras"),
            "DATA_DIR": str(self.work_dir / "data"),
            "DEVICE": "cpu",
            "DTYPE": "float32",
            "LOG_LEVEL": "warning",
        }
        full_env = {**os.environ, **defaults, **env, "PYTHONPATH": str(PROJECT_ROOT)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.work_dir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_ready(ready_timeout_s)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server was not ready in {timeout_s:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.25)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Send `sig`, wait for the exit, return the exit code (killed after `timeout_s`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """`start_server(ENV_VAR=value, ...)` starts a real server; every one started is stopped after the test."""
    started: list[ServerProcess] = []

    def start(work_dir: Path | None = None, **env: str) -> ServerProcess:
        server = ServerProcess(work_dir or tmp_path / f"server{len(started)}", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def with_lora_b_biases(path, targets, only_where_the_layer_has_one: bool = True):
    """Add a lora_B bias (PEFT's lora_bias) to the LoRA file's layers; returns the file."""
    state = load_file(path)
    generator = torch.Generator().manual_seed(74)
    for key in [k for k in state if k.endswith("lora_B.weight")]:
        component, module = key.removesuffix(".lora_B.weight").split(".", 1)
        layer = targets.get((component, module)) or targets.get((component, module.removeprefix("text_model.")))
        if layer.bias is not None or not only_where_the_layer_has_one:
            state[key.replace(".weight", ".bias")] = torch.randn(state[key].shape[0], generator=generator) * 0.05
    save_file(state, path)
    return path
