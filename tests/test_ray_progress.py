"""Progress and interrupt under Ray Serve: a job's steps and an AUTOMATIC1111 request's steps reach the ingress
as the replica makes them, and /sdapi/v1/interrupt reaches the replica, which answers with the image reached.
One replica on a local Ray instance (start ~30 s), the embedded model.

Skipped when ray is not installed (`pip install .[ray]`; scripts/setup.sh installs it).
"""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.conftest import SIZE, job_events, ray_app, small_request, test_settings, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

APP_NAME = "brand-images-progress-test"
DEADLINE_S = 180
LONG_STEPS = 60  # an A1111 request still running when the interrupt lands; short enough to run to the end


@pytest.fixture(scope="module")
def client(model_cache_dir, tmp_path_factory, make_brand):
    work = tmp_path_factory.mktemp("ray-progress")
    make_brand(work / "loras", "acme", seed=1)
    # batch_max_size=1: the ingress runs one job at a time, so a job can be held queued behind another.
    settings = test_settings(
        model_cache_dir, work / "loras", data_dir=work / "data", torch_threads=1, ray_replicas=1,
        ray_replica_cpus=1, request_timeout_s=120, batch_max_size=1,
    )  # fmt: skip
    with ray_app(settings, APP_NAME, num_cpus=2) as client:
        yield client


def submit(client, **fields) -> dict:
    response = client.post("/jobs", json=small_request(**fields))
    assert response.status_code == 202, response.text
    return response.json()


def test_a_10_step_job_streams_10_progress_events_then_succeeded_through_the_ingress(client):
    holder = submit(client, width=256, height=256, num_inference_steps=100, seed=1)
    wait_for(lambda: client.get(f"/jobs/{holder['id']}").json()["status"] == "running", "the long job to run")
    # The holder's own steps reach the ingress: its job reports the step it is at.
    wait_for(lambda: (client.get(f"/jobs/{holder['id']}").json()["progress"] or {}).get("step", 0) >= 1, "a step")
    assert "jobs_pending 1.0" in client.get("/metrics").text

    job = submit(client, num_inference_steps=10, scheduler="euler", preview=True, seed=11)
    stream = []
    for name, data in job_events(client, job["id"]):  # connected while the job waits: every event comes
        stream.append((name, data))
        if name == "queued":
            assert client.delete(f"/jobs/{holder['id']}").status_code in (200, 202)
    names = [name for name, _ in stream]
    assert [n for n in names if n != "progress"] == ["queued", "running", "succeeded"]
    progress = [data for name, data in stream if name == "progress"]
    assert [(p["step"], p["steps"]) for p in progress] == [(i, 10) for i in range(1, 11)]
    # PREVIEW_EVERY=5 by default: steps 5 and 10 carry a small PNG made from the latents (on the replica).
    assert [p["step"] for p in progress if "preview" in p] == [5, 10]
    preview = Image.open(io.BytesIO(base64.b64decode(progress[-1]["preview"])))
    assert preview.format == "PNG" and preview.size == (SIZE // 8, SIZE // 8)
    done = stream[-1][1]
    assert done["progress"] == {"step": 10, "steps": 10}
    # The same image as /generate's through the same ingress (the plain, unstreamed call).
    plain = client.post("/generate", json=small_request(num_inference_steps=10, scheduler="euler", seed=11)).json()
    image = client.get(f"/jobs/{job['id']}/image")
    assert image.content == base64.b64decode(plain["image"])
    assert client.get(f"/jobs/{holder['id']}").json()["status"] == "canceled"
    assert "jobs_pending 0.0" in client.get("/metrics").text


def test_a1111_progress_and_interrupt_reach_the_replica(client):
    fields = dict(prompt="a red coffee cup <lora:acme:0.7>", seed=77, width=SIZE, height=SIZE, steps=LONG_STEPS,
                  sampler_name="Euler a")  # fmt: skip
    replies: list = []
    worker = threading.Thread(
        target=lambda: replies.append(client.post("/sdapi/v1/txt2img", json={**fields, "n_iter": 2}))
    )
    worker.start()

    running = wait_for(
        lambda: (p := client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] >= 1 and p,
        "a step to be reported at the ingress",
    )
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(DEADLINE_S)

    assert running["state"]["sampling_steps"] == LONG_STEPS and running["state"]["job_count"] == 2
    assert 0 < running["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(running["current_image"])))
    assert preview.size == (SIZE // 8, SIZE // 8)  # the latent preview, made on the replica
    (reply,) = replies
    assert reply.status_code == 200, reply.text
    result = reply.json()
    info = json.loads(result["info"])
    assert len(result["images"]) == 1 and info["all_seeds"] == [77]  # the second image never started
    full = client.post("/sdapi/v1/txt2img", json=fields)
    assert full.status_code == 200, full.text
    stopped, whole = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))).astype(int)
                      for r in (result, full.json()))  # fmt: skip
    assert np.abs(stopped - whole).max() > 0  # stopped before the last step
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
