"""Training jobs: `POST /lora/{brand_id}/train`, `GET /train/jobs[/{job_id}]`, `DELETE /train/jobs/{job_id}`.

The dataset zip streams to a temporary file as it arrives (bounded by TRAIN_MAX_DATASET_MB: 413), is
extracted with its paths, links, member count and sizes checked, and every image is opened and
every caption read before the job starts: a bad dataset is a 422 that names the file. The job then
runs in a child process (app/train/jobs.py); one at a time (409). These paths are exempt from
MAX_BODY_BYTES and need the admin key when ADMIN_API_KEY is set (app/api/security.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from app.api.deps import CallerDep, StateDep
from app.api.routes.lora_versions import _StreamingForm, multipart_body, stream_form
from app.errors import InvalidRequest, ServiceUnavailable
from app.lora.registry import ID_PATTERN
from app.lora.safetensors_header import MIB
from app.lora.uploads import UploadRefused
from app.observability import audit
from app.state import AppState
from app.train.dataset import InvalidDataset, extract_zip, load_dataset
from app.train.jobs import TrainJobNotFound, TrainJobs
from app.train.options import TrainOptions, parse_config_json

router = APIRouter(tags=["training"])

BrandPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern, description="the brand's folder name")]
CONFIG_KEYS = ", ".join(TrainOptions.model_fields)


class TrainJobPublic(BaseModel):
    job_id: str
    brand_id: str
    state: str  # queued | running | done | failed | cancelled
    step: int
    steps: int
    loss: float | None
    version: str | None
    error: str | None


TRAIN_BODY = multipart_body(
    "dataset",
    {
        "dataset": {"type": "string", "format": "binary", "description": "a .zip of images with same-name .txt "
                    "captions (or a metadata.jsonl with file_name and text)"},
        "config": {"type": "string", "description": f"a JSON object of options: {CONFIG_KEYS}"},
    },
)  # fmt: skip


class _ZipSink:
    """Where the dataset part streams: a temporary file in the job's folder, refused beyond the limit."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes, self.size = path, max_bytes, 0
        self._file = open(path, "wb")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadRefused(413, f"dataset is larger than the limit of {self.max_bytes // MIB} MB "
                                     "(TRAIN_MAX_DATASET_MB)", "dataset")  # fmt: skip
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _DatasetForm(_StreamingForm):
    FILE_FIELD = "dataset"
    FIELDS = ("dataset", "config")

    def __init__(self, zip_path: Path, max_bytes: int):
        super().__init__("", None)
        self.zip_path, self.max_bytes = zip_path, max_bytes

    def _open_file(self, filename: str) -> _ZipSink:
        if filename and not filename.lower().endswith(".zip"):
            raise UploadRefused(422, f"dataset {filename!r} must be a .zip of images and .txt captions", "dataset")
        return _ZipSink(self.zip_path, self.max_bytes)


def _jobs(state: AppState) -> TrainJobs:
    return state.train_jobs


@router.post(
    "/lora/{brand_id}/train", status_code=202, response_model=TrainJobPublic, openapi_extra=TRAIN_BODY,
    responses={409: {"description": "a training job is running"}, 413: {"description": "dataset too large"},
               422: {"description": "bad dataset or config"}},
)  # fmt: skip
async def start_training(brand_id: BrandPath, request: Request, state: StateDep, caller: CallerDep):
    jobs = _jobs(state)
    jobs.ensure_idle()  # 409 before the upload is read
    if state.draining:
        raise ServiceUnavailable("the service is shutting down")
    state.registry.versions(brand_id)  # a brand folder that leads outside the LoRA root: 422
    s = state.settings
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(422, "send multipart/form-data with a 'dataset' part (a .zip of images and .txt "
                                 f"captions) and an optional 'config' field (a JSON object of {CONFIG_KEYS})",
                            "dataset")  # fmt: skip
    max_bytes = s.train_max_dataset_mb * MIB
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + 2 * MIB:
        raise UploadRefused(413, f"request is larger than the dataset limit of {s.train_max_dataset_mb} MB "
                                 "(TRAIN_MAX_DATASET_MB)", "dataset")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="train-job-"))
    try:
        form = _DatasetForm(workdir / "dataset.zip", max_bytes)
        try:
            await stream_form(request, boundary, form)
        except BaseException:
            if form.pending is not None:
                form.pending.abort()
            raise
        if form.pending is None:
            raise UploadRefused(422, "the 'dataset' part is missing: send the zip as a file field named 'dataset'",
                                "dataset")  # fmt: skip
        form.pending.close()
        if not form.done_file:
            raise UploadRefused(422, "the upload ended before the 'dataset' part was complete", "dataset")
        options = parse_config_json(form.fields.get("config", ""))
        data_dir = workdir / "data"
        await run_in_threadpool(_unpack, workdir / "dataset.zip", data_dir, s.train_max_images, max_bytes)
        job = jobs.start(brand_id, data_dir, options, workdir)
        job.key_name = caller.name
        audit("train", brand_id, job=job.id)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return JSONResponse(status_code=202, content=job.public(), headers={"Location": f"/train/jobs/{job.id}"})


def _unpack(archive: Path, data_dir: Path, max_images: int, max_bytes: int) -> None:
    data_dir.mkdir()
    try:
        # members: images, their captions, a metadata.jsonl and folders
        extract_zip(archive, data_dir, max_members=2 * max_images + 64, max_bytes=max_bytes)
        os.unlink(archive)
        load_dataset(data_dir, max_images=max_images)
    except InvalidDataset as exc:
        raise InvalidRequest("dataset", f"dataset refused: {exc}") from None


@router.get("/train/jobs", response_model=list[TrainJobPublic])
async def list_jobs(state: StateDep, caller: CallerDep):
    """The jobs of the key's brands."""
    return [job.public() for job in _jobs(state).list() if caller.may_use(job.brand_id)]


def _own_job(state: AppState, job_id: str, caller):
    """The job, or 404 for a job of a brand outside the key's (the answer for a job that does not exist)."""
    job = _jobs(state).get(job_id)
    if not caller.may_use(job.brand_id):
        raise TrainJobNotFound(job_id)
    return job


@router.get("/train/jobs/{job_id}", response_model=TrainJobPublic, responses={404: {"description": "no such job"}})
async def get_job(job_id: str, state: StateDep, caller: CallerDep):
    return _own_job(state, job_id, caller).public()


@router.delete("/train/jobs/{job_id}", response_model=TrainJobPublic, responses={404: {"description": "no such job"}})
async def cancel_job(job_id: str, state: StateDep, caller: CallerDep):
    """Cancel a queued or running job (the child stops and leaves no version); a finished job is returned as is."""
    _own_job(state, job_id, caller)
    return _jobs(state).cancel(job_id).public()
