"""Training (#16): `app.train` on the embedded model, its result as a standard LoRA, and the HTTP jobs.

The dataset is four constant-colour 64x64 PNGs with captions. The library run is trained once per
module (100 steps, batch 4, learning rate 1e-2) and shared.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from app.config import Settings
from app.train.options import TrainOptions
from tests.conftest import assert_as_accurate_as_diffusers, load_reference_pipe, render, spec, test_settings

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
STEPS = 100
OPTIONS = dict(steps=STEPS, resolution=64, batch_size=4, learning_rate=1e-2, rank=4, seed=0)


def write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"zxq {name} square")
    return folder


def dataset_zip(members: dict[str, bytes] | None = None) -> bytes:
    """The test dataset as a zip (or the given members)."""
    if members is None:
        members = {}
        for name, colour in COLOURS.items():
            png = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(png, format="PNG")
            members[f"{name}.png"] = png.getvalue()
            members[f"{name}.txt"] = f"zxq {name} square".encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def train_settings(workspace: Path, model_cache_dir: Path) -> Settings:
    return test_settings(model_cache_dir, workspace / "loras")


@pytest.fixture(scope="module")
def trained(workspace: Path, train_settings: Settings, model_dir: Path):
    from app.train import train_lora

    started = time.perf_counter()
    result = train_lora(train_settings, "acme", write_dataset(workspace / "data"), TrainOptions(**OPTIONS),
                        samples=1, sample_steps=2)  # fmt: skip
    print(f"\ntrained {STEPS} steps in {time.perf_counter() - started:.1f} s: "
          f"loss {result.loss_first:.4f} -> {result.loss_last:.4f}")  # fmt: skip
    return result


def test_training_lowers_the_loss_and_publishes_the_next_version(trained, train_settings):
    assert trained.loss_last < trained.loss_first
    root = Path(train_settings.lora_base_dir)
    assert trained.version == "v1" and trained.file == root / "acme" / "v1" / "style.safetensors"
    meta = json.loads((root / "acme" / "v1" / "metadata.json").read_text())
    training = meta["training"]
    for key in ("steps", "learning_rate", "rank", "alpha", "resolution", "images", "dataset_sha256", "base_model",
                "loss_first", "loss_last", "seconds"):  # fmt: skip
        assert key in training, key
    assert (training["steps"], training["rank"], training["alpha"], training["images"]) == (STEPS, 4, 4.0, 4)
    assert training["base_model"] == "tiny" and len(training["dataset_sha256"]) == 64
    assert (root / "acme" / "v1" / "samples" / "seed-0.png").is_file()
    with safe_open(str(trained.file), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert any(".to_out.0.lora_A.weight" in k for k in keys)
    # nothing half made or hidden left behind
    assert sorted(p.name for p in (root / "acme").iterdir()) == ["v1"]
    assert not (root / ".checkpoints").exists()


def _latents(pipe, prompt: str, seed: int) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(prompt=prompt, width=64, height=64, num_inference_steps=8, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images  # fmt: skip


def test_sampling_the_caption_with_the_lora_lands_nearer_the_training_latents(trained, model_dir, workspace):
    base, tuned = load_reference_pipe(model_dir), load_reference_pipe(model_dir)
    tuned.load_lora_weights(str(trained.file))  # diffusers' own loader takes the file as it is
    for name in ("red", "blue"):
        pixels = np.asarray(Image.open(workspace / "data" / f"{name}.png").convert("RGB"), dtype=np.float32)
        image = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            target = base.vae.encode(image).latent_dist.mean * base.vae.config.scaling_factor
        caption = f"zxq {name} square"
        before = float(((_latents(base, caption, 0) - target) ** 2).mean())
        after = float(((_latents(tuned, caption, 0) - target) ** 2).mean())
        assert after < before, (name, before, after)


def test_the_trained_file_serves_as_diffusers_applies_it(trained, engine, model_dir):
    from app.jobs import ActiveAdapter

    ours = render(engine, spec(seed=3), [ActiveAdapter("trained", engine.load_adapter(trained.file), 1.0)])
    base = render(engine, spec(seed=3))
    assert float(np.abs(ours - base).max()) > 1e-3, "the LoRA changes the image"
    assert_as_accurate_as_diffusers(ours, model_dir, [(trained.file, 1.0)], seed=3, guidance=7.5)


def test_resume_continues_an_interrupted_run_exactly_and_a_second_run_is_the_next_version(
    trained, train_settings, workspace
):
    from app.train import train_lora

    data = workspace / "data"
    root = Path(train_settings.lora_base_dir)
    options = TrainOptions(**{**OPTIONS, "steps": 6, "seed": 5})

    def stop_at_3(step, steps, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(train_settings, "acme", data, options, samples=0, checkpoint_every=2, progress=stop_at_3)
    assert sorted(p.name for p in (root / "acme").iterdir()) == ["v1"], "an interrupted run publishes nothing"
    assert (root / ".checkpoints" / "acme" / "state.json").is_file()
    with pytest.raises(Exception, match="made with seed=5"):
        train_lora(train_settings, "acme", data, TrainOptions(**{**OPTIONS, "steps": 6}), resume=True, samples=0)
    resumed = train_lora(train_settings, "acme", data, options, resume=True, samples=0)
    assert resumed.version == "v2" and resumed.metadata["training"]["resumed_from_step"] == 3
    assert not (root / ".checkpoints").exists()
    whole = train_lora(train_settings, "acme", data, options, samples=0)
    assert whole.version == "v3"
    from safetensors.torch import load_file

    a, b = load_file(str(resumed.file)), load_file(str(whole.file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume = the uninterrupted run"
    with pytest.raises(Exception, match="nothing to resume"):
        train_lora(train_settings, "acme", data, options, resume=True, samples=0)


def test_a_run_without_resume_says_it_discards_an_earlier_runs_checkpoint(train_settings, tmp_path, caplog):
    from app.train import train_lora

    data = write_dataset(tmp_path / "data")
    checkpoints = Path(train_settings.lora_base_dir) / ".checkpoints" / "initech"
    options = TrainOptions(**{**OPTIONS, "steps": 4})

    def stop_at(at: int):
        def progress(step, steps, loss):
            if step == at:
                raise KeyboardInterrupt

        return progress

    with pytest.raises(KeyboardInterrupt):
        train_lora(train_settings, "initech", data, options, samples=0, checkpoint_every=1, progress=stop_at(2))
    assert json.loads((checkpoints / "state.json").read_text())["step"] == 2
    caplog.clear()

    # A new run without --resume (stopped at its first step, keeping no checkpoint of its own).
    with caplog.at_level(logging.WARNING, logger="app.train.trainer"), pytest.raises(KeyboardInterrupt):
        train_lora(train_settings, "initech", data, options, samples=0, progress=stop_at(1))

    said = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    assert said == ["discarding the checkpoint of an earlier interrupted run at step 2 (use --resume to continue it)"]
    assert not checkpoints.exists()
    with pytest.raises(Exception, match="nothing to resume"):
        train_lora(train_settings, "initech", data, options, resume=True, samples=0)


# ---- over HTTP ------------------------------------------------------------------------------------


def _post(client, brand: str, body: bytes | None = None, config: dict | str | None = None, headers=None,
          filename: str = "data.zip"):  # fmt: skip
    files = {"dataset": (filename, dataset_zip() if body is None else body, "application/zip")}
    data = {} if config is None else {"config": config if isinstance(config, str) else json.dumps(config)}
    return client.post(f"/lora/{brand}/train", files=files, data=data, headers=headers or {})


def _wait(client, job_id: str, states, timeout_s: float = 120, at_step: int = 0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/train/jobs/{job_id}").json()
        if job["state"] in states and job["step"] >= at_step:
            return job
        assert job["state"] not in ("failed",) or "failed" in states, job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def _refusal(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " ".join(d["msg"] for d in detail)


def test_bad_training_requests_get_a_clear_4xx(make_client, lora_root):
    big = np.random.default_rng(0).integers(0, 255, 1_200_000, dtype=np.uint8).tobytes()
    png = dataset_zip()
    cases = [
        (dict(body=b"not a zip"), 422, "not a valid zip"),
        (dict(body=dataset_zip({"../evil.png": png, "../evil.txt": b"x"})), 422, "'..'"),
        (dict(body=dataset_zip({"/abs/a.png": png, "/abs/a.txt": b"x"})), 422, "must be relative"),
        (dict(body=dataset_zip({"a.png": zipfile.ZipFile(io.BytesIO(png)).read("red.png")})), 422, "no caption"),
        (dict(body=dataset_zip({"a.png": b"\x89PNG not really", "a.txt": b"x"})), 422, "cannot be read"),
        (dict(body=dataset_zip({"a.txt": b"x"})), 422, "no images found"),
        (dict(body=dataset_zip({f"{i}.txt": b"" for i in range(80)})), 422, "members, more than the limit"),
        (dict(body=dataset_zip({"zeros.png": bytes(2 * 1024 * 1024)})), 422, "more than the limit"),
        (dict(body=big), 413, "TRAIN_MAX_DATASET_MB"),
        (dict(config={"steps": 0}), 422, "greater than or equal to 1"),
        (dict(config={"stepz": 5}), 422, "unknown option 'stepz'; allowed: steps, rank"),
        (dict(config={"resolution": 100}), 422, "multiple of 8"),
        (dict(config="{nope"), 422, "not valid JSON"),
        (dict(filename="data.tar"), 422, "must be a .zip"),
    ]
    admin = {"Authorization": "Bearer admin-key"}
    with make_client(lora_root, admin_api_key="admin-key", train_max_dataset_mb=1, train_max_images=4) as c:
        assert _post(c, "acme").status_code == 401
        assert c.get("/train/jobs/nope").status_code == 401
        for kwargs, status, message in cases:
            r = _post(c, "acme", headers=admin, **kwargs)
            assert r.status_code == status and message in _refusal(r), (kwargs.get("config"), r.status_code, r.text)
        r = c.post("/lora/acme/train", json={"steps": 3}, headers=admin)
        assert r.status_code == 422 and "multipart/form-data" in _refusal(r)
        assert c.get("/train/jobs/nope", headers=admin).status_code == 404
        assert c.delete("/train/jobs/nope", headers=admin).status_code == 404
    assert [p.name for p in lora_root.iterdir()] == ["README.md"], "a refused request leaves nothing there"


def test_a_training_job_runs_aside_is_cancellable_and_its_version_serves_at_once(make_client, lora_root):
    from tests.conftest import small_request

    with make_client(lora_root) as c:
        # a long job: running, a second one is refused, then cancelled mid-way: no version
        r = _post(c, "acme", config={**OPTIONS, "steps": 5000})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        running = _wait(c, job_id, ("running",), at_step=2)
        assert running["steps"] == 5000 and running["loss"] is not None
        assert c.post("/generate", json=small_request()).status_code == 200, "the service keeps serving"
        busy = _post(c, "acme")
        assert busy.status_code == 409 and job_id in busy.json()["detail"]
        assert c.delete(f"/train/jobs/{job_id}").status_code == 200
        cancelled = _wait(c, job_id, ("cancelled",), timeout_s=30)
        assert cancelled["version"] is None
        assert not (lora_root / "acme").exists() or not any((lora_root / "acme").iterdir())
        assert c.post("/generate", json=small_request(brand_id="acme", strict=True)).status_code == 422

        # a short job: done, and the next request for the brand gets the new version
        r = _post(c, "acme", config={**OPTIONS, "steps": 8})
        assert r.status_code == 202, r.text
        done = _wait(c, r.json()["job_id"], ("done", "failed"))
        assert done["state"] == "done" and done["version"] == "v1" and done["step"] == 8, done
        g = c.post("/generate", json=small_request(brand_id="acme", strict=True))
        assert g.status_code == 200 and g.json()["loras"][0]["version"] == "v1", g.text
        meta = c.get("/lora/acme/metadata").json()
        assert meta["metadata"]["training"]["steps"] == 8
