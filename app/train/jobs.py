"""Training jobs of the HTTP API: one at a time, each in a child process, kept in memory (torch-free).

A job runs `python -m app.train ... --progress-json` in a child process, so the service keeps serving
while it trains; the child's JSON lines update the job (step, loss, version). The child gets the
service's own model and LoRA settings through its environment and runs in the job's working folder
(which holds the extracted dataset and is removed when the job ends). It keeps no checkpoint, so a
cancelled or failed job leaves nothing in the LoRA folder: the version appears only when complete.

Jobs live in this process's memory: a restart forgets them (the versions they published stay), and
stopping the app kills a running child.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.config import PROJECT_ROOT, Settings
from app.train.options import TrainOptions

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
KEEP_FINISHED = 100  # finished jobs remembered (oldest forgotten first)
CANCEL_GRACE_S = 10.0  # after SIGTERM, the child is killed if it has not exited


class TrainJobBusy(Exception):
    """Another training job is queued or running (one at a time)."""

    def __init__(self, job_id: str):
        super().__init__(f"training job {job_id} is still running; wait for it to finish or cancel it "
                         f"(DELETE /train/jobs/{job_id})")  # fmt: skip
        self.job_id = job_id


class TrainJobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no training job {job_id!r} (jobs are kept in memory: a restart forgets them)")


@dataclass
class TrainJob:
    id: str
    brand_id: str
    steps: int
    workdir: Path
    state: str = "queued"
    step: int = 0
    loss: float | None = None
    version: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    process: subprocess.Popen | None = None
    cancel_requested: bool = False
    published: bool = False
    key_name: str = "-"  # the API key that started it (audit lines)

    def public(self) -> dict:
        return {
            "job_id": self.id,
            "brand_id": self.brand_id,
            "state": self.state,
            "step": self.step,
            "steps": self.steps,
            "loss": self.loss,
            "version": self.version,
            "error": self.error,
        }


def child_command(brand_id: str, data_dir: Path, options: TrainOptions) -> list[str]:
    command = [sys.executable, "-m", "app.train", "--brand", brand_id, "--data", str(data_dir), "--progress-json",
               "--checkpoint-every", "0"]  # fmt: skip
    for name, value in options.model_dump().items():
        if name == "text_encoder":
            command += ["--text-encoder"] if value else []
        elif value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def child_environment(settings: Settings) -> dict[str, str]:
    """The service's settings that matter to training, so the child trains on the model the service serves."""
    env = {
        **os.environ,
        "MODEL_ID": settings.model_id,
        "DEVICE": settings.device,
        "DTYPE": settings.dtype,
        "MODEL_CACHE_DIR": str(settings.model_cache_dir),
        "LORA_BASE_DIR": str(settings.lora_base_dir),
        "LORA_MAX_FILE_MB": str(settings.lora_max_file_mb),
        "TORCH_THREADS": str(settings.torch_threads),
        "LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    return env


class TrainJobs:
    def __init__(self, settings: Settings, on_published: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.on_published = on_published  # (brand_id, version), called when a job published its version
        self._jobs: OrderedDict[str, TrainJob] = OrderedDict()
        self._lock = threading.Lock()

    def active(self) -> TrainJob | None:
        with self._lock:
            return next((job for job in self._jobs.values() if job.state in ACTIVE), None)

    def ensure_idle(self) -> None:
        job = self.active()
        if job is not None:
            raise TrainJobBusy(job.id)

    def get(self, job_id: str) -> TrainJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise TrainJobNotFound(job_id)
        return job

    def list(self) -> list[TrainJob]:
        with self._lock:
            return list(self._jobs.values())

    def start(self, brand_id: str, data_dir: Path, options: TrainOptions, workdir: Path) -> TrainJob:
        """Start the child; `workdir` (holding `data_dir`) belongs to the job from here on, removed at its end."""
        with self._lock:
            busy = next((job for job in self._jobs.values() if job.state in ACTIVE), None)
            if busy is not None:
                raise TrainJobBusy(busy.id)
            job = TrainJob(id=uuid.uuid4().hex, brand_id=brand_id, steps=options.steps, workdir=workdir)
            self._jobs[job.id] = job
            self._forget_old()
            log = open(workdir / "train.log", "wb")
            try:
                job.process = subprocess.Popen(
                    child_command(brand_id, data_dir, options), cwd=workdir, env=child_environment(self.settings),
                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                self._finish(job, "failed", f"the training process could not start: {exc}")
                raise
            finally:
                log.close()
            job.state = "running"
        threading.Thread(target=self._follow, args=(job,), name=f"train-{job.id[:8]}", daemon=True).start()
        logger.info("training job %s started for %s (%d steps)", job.id, brand_id, options.steps)
        return job

    def cancel(self, job_id: str) -> TrainJob:
        job = self.get(job_id)
        with self._lock:
            if job.state not in ACTIVE:
                return job
            job.cancel_requested = True
        self._terminate(job)
        return job

    def shutdown(self) -> None:
        """Stop a running child (the app is stopping); its job ends as cancelled."""
        job = self.active()
        if job is not None:
            job.cancel_requested = True
            self._terminate(job, wait=True)

    # -- the child --------------------------------------------------------------------------------

    def _terminate(self, job: TrainJob, wait: bool = False) -> None:
        process = job.process
        if process is None or process.poll() is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)  # the child cleans up its temporary files and exits
        except ProcessLookupError:
            return

        def kill_later():
            try:
                process.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()

        if wait:
            kill_later()
        else:
            threading.Thread(target=kill_later, name=f"train-kill-{job.id[:8]}", daemon=True).start()

    def _follow(self, job: TrainJob) -> None:
        process = job.process
        error = None
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # not ours (a library printing to stdout)
            kind = event.get("event") if isinstance(event, dict) else None
            if kind == "step":
                job.step, job.loss = int(event.get("step", job.step)), event.get("loss", job.loss)
            elif kind == "done":
                job.version, job.published = event.get("version"), True
            elif kind == "error":
                error = str(event.get("error"))
        code = process.wait()
        process.stdout.close()
        if job.published:
            # The version is on disk, even when a cancel came too late to stop it.
            self._finish(job, "done", None)
            _audit_published(self.settings, job)
            if self.on_published is not None:
                try:
                    self.on_published(job.brand_id, job.version)
                except Exception:
                    logger.exception("after training job %s", job.id)
        elif job.cancel_requested:
            self._finish(job, "cancelled", None)
        else:
            self._finish(job, "failed", error or f"the training process exited with status {code}: "
                                               f"{self._log_tail(job)}")  # fmt: skip
        shutil.rmtree(job.workdir, ignore_errors=True)
        logger.info("training job %s %s%s", job.id, job.state, f" ({job.error})" if job.error else "")

    def _finish(self, job: TrainJob, state: str, error: str | None) -> None:
        with self._lock:
            job.state, job.error, job.finished_at = state, error, time.time()

    @staticmethod
    def _log_tail(job: TrainJob) -> str:
        try:
            lines = (job.workdir / "train.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:])[-500:] or "no output"

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state not in ACTIVE]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]


def _audit_published(settings: Settings, job: TrainJob) -> None:
    from app.lora.uploads import UPLOAD_FILE_NAME
    from app.observability import audit

    path = Path(settings.lora_base_dir) / job.brand_id / str(job.version) / UPLOAD_FILE_NAME
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    audit("trained", job.brand_id, job.version, digest, key=job.key_name, job=job.id)
