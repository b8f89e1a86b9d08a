"""Jobs against a real uvicorn: the event stream, cancelling, webhooks, and nothing lost to kill -9."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from app.jobqueue.store import JobStore
from app.jobs import GenerationSpec
from tests.conftest import ServerProcess, job_events, pixels, small_request, wait_for

SECRET = "test-webhook-secret"
DEADLINE_S = 180  # a hang guard only: every wait below ends on a state, long before this


# ---- helpers -----------------------------------------------------------------------------------------


def events(url: str, job_id: str):
    """The job's Server-Sent Events as (name, data) pairs, until the server closes the stream."""
    with httpx.Client(base_url=url) as client:
        yield from job_events(client, job_id)


def submit(url: str, **fields) -> dict:
    response = httpx.post(f"{url}/jobs", json=small_request(**fields), timeout=30)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}" and job["status"] == "queued"
    return job


def get_job(url: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_ended(url: str, job_id: str) -> dict:
    return wait_for(lambda: (j := get_job(url, job_id))["status"] in ("succeeded", "failed", "canceled") and j, "end")


class WebhookReceiver:
    """A loopback HTTP server that records each POST; the first `fail_first` answers are 500."""

    def __init__(self, fail_first: int = 0):
        self.received: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    failing = len(receiver.received) <= receiver.fail_first
                    receiver.arrived.notify_all()
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, count: int) -> list[tuple[dict, bytes]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, DEADLINE_S), "no webhook came"
            return list(self.received)


@pytest.fixture(scope="module")
def receiver():
    receiver = WebhookReceiver(fail_first=1)
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver):
    work = tmp_path_factory.mktemp("jobs-server")
    env = {
        "WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.port}",
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_RETRY_BACKOFF_S": "0.05",
        # When several jobs wait, the worker waits this long for them to fill a loop: the shared-loop test
        # needs its two jobs in one loop, whichever reaches the queue first. A lone job never waits.
        "BATCH_WAIT_MS": "500",
    }
    server = ServerProcess(work, env)
    yield server
    server.stop()


# ---- the event stream --------------------------------------------------------------------------------


def hold_the_worker(url: str) -> dict:
    """A long job, once it runs: jobs submitted now wait behind it (a loop of another size) until it is canceled."""
    job = submit(url, width=256, height=256, num_inference_steps=100, seed=1)
    wait_for(lambda: get_job(url, job["id"])["status"] == "running", "the long job to run")
    return job


def test_a_10_step_job_streams_queued_running_10_progress_events_then_succeeded(server):
    holder = hold_the_worker(server.url)
    job = submit(server.url, num_inference_steps=10, scheduler="euler", preview=True, seed=11)
    stream = []
    for name, data in events(server.url, job["id"]):  # connected while the job waits: every event comes
        stream.append((name, data))
        if name == "queued":
            httpx.delete(f"{server.url}/jobs/{holder['id']}", timeout=30)
    names = [name for name, _ in stream]
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    assert [n for n in names if n != "progress"] == ["queued", "running", "succeeded"]
    progress = [data for name, data in stream if name == "progress"]
    assert [(p["step"], p["steps"]) for p in progress] == [(i, 10) for i in range(1, 11)]
    # PREVIEW_EVERY=5 by default: steps 5 and 10 carry a small PNG made from the latents.
    assert [p["step"] for p in progress if "preview" in p] == [5, 10]
    preview = Image.open(io.BytesIO(base64.b64decode(progress[-1]["preview"])))
    assert preview.format == "PNG" and max(preview.size) <= 128

    done = stream[-1][1]
    assert done["id"] == job["id"] and done["progress"] == {"step": 10, "steps": 10}
    assert done == get_job(server.url, job["id"])
    # The result has /generate's fields, and the image is /generate's for the same body and seed.
    plain = httpx.post(
        f"{server.url}/generate", json=small_request(num_inference_steps=10, scheduler="euler", seed=11), timeout=120
    ).json()
    assert set(done["result"]) == set(plain)
    assert done["result"]["image"] == plain["image"] and done["result"]["seed"] == 11
    image = httpx.get(f"{server.url}/jobs/{job['id']}/image", timeout=30)
    assert image.headers["content-type"] == "image/png" and image.content == base64.b64decode(plain["image"])
    # A client that connects late gets the terminal event at once, and the stream closes.
    assert [name for name, _ in events(server.url, job["id"])] == ["succeeded"]


def test_a_client_that_connects_while_the_job_runs_hears_running_not_a_wait_that_is_over(server):
    holder = hold_the_worker(server.url)
    stream = events(server.url, holder["id"])
    name, data = next(stream)
    assert name == "running" and data["status"] == "running"
    httpx.delete(f"{server.url}/jobs/{holder['id']}", timeout=30)
    rest = [name for name, _ in stream]
    assert "queued" not in rest and "running" not in rest and rest[-1] == "canceled"


def test_a_preview_less_job_streams_no_preview_and_the_seed_is_drawn_at_acceptance(server):
    job = submit(server.url, seed=None)
    stream = list(events(server.url, job["id"]))
    assert all("preview" not in data for name, data in stream if name == "progress")
    seed = stream[-1][1]["result"]["seed"]
    plain = httpx.post(f"{server.url}/generate", json=small_request(seed=seed), timeout=120).json()
    assert stream[-1][1]["result"]["image"] == plain["image"]


# ---- cancelling --------------------------------------------------------------------------------------


def test_cancelling_a_running_job_stops_it_at_its_next_step_and_the_next_job_starts(server):
    long = hold_the_worker(server.url)
    following = submit(server.url, num_inference_steps=3, seed=2)  # another loop: it cannot join the long one
    never = submit(server.url, num_inference_steps=4, seed=3)
    canceled_queued = httpx.delete(f"{server.url}/jobs/{never['id']}", timeout=30).json()
    assert canceled_queued["status"] == "canceled" and canceled_queued["canceled"] is True

    stream = events(server.url, long["id"])
    steps_seen = []
    for name, data in stream:
        if name == "progress":
            steps_seen.append(data["step"])
            if data["step"] == steps_seen[0] + 2:
                answer = httpx.delete(f"{server.url}/jobs/{long['id']}", timeout=30)
                assert answer.status_code == 200
                assert answer.json()["status"] == "canceled" and answer.json()["canceled"] is True
        if name == "canceled":
            terminal = data
            break
    assert list(stream) == []  # closed after the terminal event
    assert terminal["status"] == "canceled" and terminal["result"] is None
    # It stopped at its next step: no step after the one that was running when it was canceled.
    canceled_at = steps_seen[0] + 2
    assert max(steps_seen) <= canceled_at + 1 and terminal["progress"]["step"] <= canceled_at + 1

    done = wait_until_ended(server.url, following["id"])
    assert done["status"] == "succeeded"
    # The worker was free at once: the next job started within about one step of the long job's
    # (the long job's own pace, measured on the server's clock), not after its 96 remaining steps.
    step_s = (_t(terminal["finished_at"]) - _t(terminal["started_at"])) / terminal["progress"]["step"]
    assert _t(done["started_at"]) - _t(terminal["finished_at"]) < 2 * step_s
    skipped = get_job(server.url, never["id"])
    assert skipped["status"] == "canceled" and skipped["started_at"] is None


def _t(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_cancelling_one_image_of_a_shared_loop_lets_the_others_come_out(server):
    holder = hold_the_worker(server.url)
    dropped, kept = (submit(server.url, num_inference_steps=8, scheduler="euler", seed=s) for s in (31, 32))
    # Both wait behind the holder, so the worker takes them into one loop once the holder is canceled.
    wait_for(lambda: httpx.get(f"{server.url}/metrics", timeout=30).text.count("generation_queue_depth 3.0"), "queue")
    httpx.delete(f"{server.url}/jobs/{holder['id']}", timeout=30)
    for name, data in events(server.url, dropped["id"]):
        if name == "progress" and data["step"] == 2:
            assert httpx.delete(f"{server.url}/jobs/{dropped['id']}", timeout=30).json()["canceled"] is True
    assert get_job(server.url, dropped["id"])["status"] == "canceled"
    done = wait_until_ended(server.url, kept["id"])
    assert done["status"] == "succeeded" and done["result"]["batch_size"] == 2
    assert done["progress"] == {"step": 8, "steps": 8}


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_inpainting_job_gives_the_image_generate_gives_for_the_same_edit(server):
    """The editing fields travel in the stored spec: a job is /generate's image for an edit too."""
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    edit = {"init_image": png_base64(Image.fromarray(gradient)), "mask_image": png_base64(mask), "strength": 0.6,
            "num_inference_steps": 4, "seed": 5}  # fmt: skip
    job = submit(server.url, **edit)
    done = wait_until_ended(server.url, job["id"])
    assert done["status"] == "succeeded", done
    plain = httpx.post(f"{server.url}/generate", json=small_request(**edit), timeout=120)
    assert plain.status_code == 200, plain.text
    assert done["result"]["image"] == plain.json()["image"]


def test_cancelling_an_ended_job_keeps_its_status_and_unknown_jobs_are_404(server):
    job = submit(server.url)
    wait_until_ended(server.url, job["id"])
    answer = httpx.delete(f"{server.url}/jobs/{job['id']}", timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "succeeded" and body["canceled"] is False and "already ended" in body["message"]
    for method, path in (("GET", "/jobs/nope"), ("GET", "/jobs/nope/image"), ("GET", "/jobs/nope/events"),
                         ("DELETE", "/jobs/nope")):  # fmt: skip
        response = httpx.request(method, f"{server.url}{path}", timeout=30)
        assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_the_list_is_newest_first_and_filters_by_status(server):
    first, second = submit(server.url, seed=21), submit(server.url, seed=22)
    wait_until_ended(server.url, first["id"]), wait_until_ended(server.url, second["id"])
    listed = httpx.get(f"{server.url}/jobs", params={"status": "succeeded", "limit": 2}, timeout=30).json()
    assert [j["id"] for j in listed["data"]] == [second["id"], first["id"]] and listed["count"] == 2
    assert all(j["status"] == "succeeded" and "image" not in (j["result"] or {}) or j["result"]["image"] is None
               for j in listed["data"])  # fmt: skip
    bad = httpx.get(f"{server.url}/jobs", params={"status": "done"}, timeout=30)
    assert bad.status_code == 422


# ---- validation and webhooks -------------------------------------------------------------------------


def test_a_job_body_is_validated_as_generate_validates_it_before_anything_is_stored(server):
    before = httpx.get(f"{server.url}/jobs", params={"limit": 100}, timeout=30).json()["count"]
    for bad in ({"width": 2048}, {"width": "64"}, {"num_inference_steps": 1000}, {"version": "v1"}, {"colour": 1}):
        generate = httpx.post(f"{server.url}/generate", json=small_request(**bad), timeout=30)
        job = httpx.post(f"{server.url}/jobs", json=small_request(**bad), timeout=30)
        assert job.status_code == generate.status_code == 422 and job.json() == generate.json(), bad
    unlisted = httpx.post(f"{server.url}/jobs", json=small_request(webhook_url="http://10.0.0.1/hook"), timeout=30)
    assert unlisted.status_code == 422
    [error] = unlisted.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"] and "10.0.0.1:80 is not allowed" in error["msg"]
    assert "WEBHOOK_ALLOWED_HOSTS" in error["msg"]
    assert httpx.get(f"{server.url}/jobs", params={"limit": 100}, timeout=30).json()["count"] == before


def test_a_webhook_is_signed_and_retried_after_a_failed_delivery(server, receiver):
    job = submit(server.url, webhook_url=receiver.url(), seed=5)
    # The receiver answers its first POST with a 500: the service tries again.
    (first_headers, first_body), (headers, body) = receiver.wait_for(2)[:2]
    assert first_body == body
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-webhook-signature"], expected)
    sent = json.loads(body)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["result"]["seed"] == 5
    delivered = wait_for(lambda: (j := get_job(server.url, job["id"]))["webhook"]["status"] == "delivered" and j, "")
    assert delivered["webhook"]["attempts"] == 2


def test_webhooks_are_refused_with_how_to_allow_them_when_no_host_is_listed(start_server):
    server = start_server()
    answer = httpx.post(f"{server.url}/jobs", json=small_request(webhook_url="https://hooks.example.com/x"), timeout=30)
    assert answer.status_code == 422
    assert "WEBHOOK_ALLOWED_HOSTS" in answer.json()["detail"][0]["msg"]


# ---- durability --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_after_a_stop_a_restart_runs_every_accepted_job_to_the_image_it_would_have_given(tmp_path, stop_signal):
    # One image per loop, so that each job's image is bit-for-bit the one /generate gives alone (and the
    # runner hands the service one job at a time: after SIGTERM the one under way finishes, the others wait).
    env = {"BATCH_MAX_SIZE": "1", "JOBS_MAX_PENDING": "4", "DATA_DIR": str(tmp_path / "data")}
    first = ServerProcess(tmp_path / "first", env)
    try:
        bodies = [dict(num_inference_steps=30, width=128, height=128, seed=s, prompt=f"a cup, take {s}") for s in
                  (101, 102, 103)] + [dict(num_inference_steps=30, width=128, height=128, seed=None)]  # fmt: skip
        jobs = [submit(first.url, **body) for body in bodies]
        full = httpx.post(f"{first.url}/jobs", json=small_request(), timeout=30)
        assert full.status_code == 429 and "JOBS_MAX_PENDING=4" in full.json()["detail"]
        wait_for(lambda: get_job(first.url, jobs[0]["id"])["status"] == "running", "the first job to run")
        before = [get_job(first.url, job["id"])["status"] for job in jobs]
    finally:
        first.stop(stop_signal)
    assert first.process.returncode == (-signal.SIGKILL if stop_signal == signal.SIGKILL else 0)
    assert before.count("succeeded") < 4  # work was left: queued or running
    stored = JobStore(tmp_path / "data")
    left = sum(1 for job in jobs if stored.get(job["id"]).status != "succeeded")
    stored.close()
    assert left > 0

    second = ServerProcess(tmp_path / "second", env)
    try:
        ended = [wait_until_ended(second.url, job["id"]) for job in jobs]
        assert [j["status"] for j in ended] == ["succeeded"] * 4
        for body, job in zip(bodies, ended, strict=True):
            seed = job["result"]["seed"]
            assert body["seed"] in (None, seed)
            plain = httpx.post(f"{second.url}/generate", json=small_request(**{**body, "seed": seed}), timeout=120)
            png = httpx.get(f"{second.url}/jobs/{job['id']}/image", timeout=30).content
            np.testing.assert_array_equal(pixels(png), pixels(base64.b64decode(plain.json()["image"])))
        metrics = httpx.get(f"{second.url}/metrics", timeout=30).text
        assert f'jobs_total{{status="succeeded"}} {left}.0' in metrics and "jobs_pending 0.0" in metrics
    finally:
        second.stop()


# ---- the store ---------------------------------------------------------------------------------------


def test_the_store_moves_jobs_only_along_the_state_machine_and_purges_after_the_ttl(tmp_path):
    store = JobStore(tmp_path)
    spec = GenerationSpec("a cup", None, 64, 64, 2, 7.5, 9)
    job = store.add(spec, [], False, False, None, "team-a", max_pending=10)
    assert job.status == "queued" and job.owner == "team-a" and job.spec == spec
    assert store.transition(job.id, "succeeded") is None  # queued cannot succeed without running
    assert store.transition(job.id, "running").started_at is not None
    assert store.requeue_interrupted() == [job.id] and store.get(job.id).status == "queued"
    store.transition(job.id, "running")
    done = store.transition(job.id, "succeeded", result={"seed": 9})
    assert done.result == {"seed": 9} and store.transition(job.id, "canceled") is None
    store.write_image(job.id, b"png")
    assert store.purge(ttl_s=3600) == 0 and store.get(job.id).status == "succeeded"
    assert store.purge(ttl_s=3600, now=time.time() + 3601) == 1 and not store.image_path(job.id).exists()
    assert store.list() == []
