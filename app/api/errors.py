"""Every error of the request path and the HTTP answer it gets: one table, two shapes.

The service's own endpoints answer in FastAPI's shape (`{"detail": [{"loc", "msg", "type"}]}` for a
field, `{"detail": "..."}` otherwise); the OpenAI-compatible endpoint renders the same answers in
OpenAI's `{"error": {...}}` shape. Replies always encode: a lone surrogate or a NaN from the client
must not turn a 422 into a 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import (
    AnsweredError,
    ClientGone,
    GenerationOutOfMemory,
    InvalidRequest,
    JobCanceled,
    LoraNotFound,
    LoraUnavailable,
    QueueFull,
    QueueTimeout,
    ServiceUnavailable,
)
from app.jobqueue.store import NoJobImage, TooManyPendingJobs, UnknownJob
from app.lora.registry import InvalidLoraId, UnsafeLoraPath
from app.lora.uploads import UploadRefused
from app.train.jobs import TrainJobBusy, TrainJobNotFound

RETRY_AFTER = {"Retry-After": "5"}


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    message: str
    field: str | None = None  # the request field at fault, for a 422
    kind: str = "value_error"
    headers: dict | None = None


# exception type -> its answer; looked up along the exception's class hierarchy.
ERROR_TABLE: dict[type[Exception], object] = {
    AnsweredError: lambda e: ErrorAnswer(e.status, str(e), e.field, e.kind, e.headers),
    InvalidRequest: lambda e: ErrorAnswer(422, str(e), e.field),
    InvalidLoraId: lambda e: ErrorAnswer(422, str(e), e.field),
    UnsafeLoraPath: lambda e: ErrorAnswer(422, str(e), "brand_id"),
    LoraUnavailable: lambda e: ErrorAnswer(422, str(e), "brand_id", "lora_unavailable"),
    UploadRefused: lambda e: ErrorAnswer(e.status, str(e), e.field if e.status == 422 else None),
    LoraNotFound: lambda e: ErrorAnswer(404, str(e)),
    TrainJobBusy: lambda e: ErrorAnswer(409, str(e), kind="conflict"),
    TrainJobNotFound: lambda e: ErrorAnswer(404, str(e)),
    QueueFull: lambda e: ErrorAnswer(
        429, f"the service is busy: {e}", kind="rate_limit", headers={"Retry-After": str(e.retry_after_s)}
    ),
    QueueTimeout: lambda e: ErrorAnswer(503, str(e), kind="timeout", headers=RETRY_AFTER),
    ServiceUnavailable: lambda e: ErrorAnswer(503, str(e), kind="unavailable", headers=RETRY_AFTER),
    ClientGone: lambda e: ErrorAnswer(499, "the client closed the connection"),
    JobCanceled: lambda e: ErrorAnswer(409, str(e), kind="canceled"),
    UnknownJob: lambda e: ErrorAnswer(404, str(e)),
    NoJobImage: lambda e: ErrorAnswer(404, str(e)),
    TooManyPendingJobs: lambda e: ErrorAnswer(429, str(e), kind="rate_limit", headers=RETRY_AFTER),
    GenerationOutOfMemory: lambda e: ErrorAnswer(
        503, f"the GPU ran out of memory for this request ({e}); try a smaller size", kind="unavailable",
        headers=RETRY_AFTER,
    ),
}  # fmt: skip


def answer_for(exc: Exception) -> ErrorAnswer | None:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls](exc)
    return None


def detail_response(answer: ErrorAnswer) -> JSONResponse:
    """The service's own shape."""
    return JSONResponse(status_code=answer.status, content=detail_content(answer), headers=answer.headers)


def detail_content(answer: ErrorAnswer) -> dict:
    if answer.status == 422 and answer.field is not None:
        return {"detail": [{"loc": ["body", answer.field], "msg": answer.message, "type": answer.kind}]}
    return {"detail": answer.message}


def error_body(exc: BaseException) -> dict:
    """{status, detail}: what the request path's error would have answered (a failed job's `error`)."""
    answer = answer_for(exc) or ErrorAnswer(500, f"internal error ({type(exc).__name__}); see the server log")
    return {"status": answer.status, **detail_content(answer)}


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type in ERROR_TABLE:
        app.add_exception_handler(exc_type, _answer)


async def _answer(_: Request, exc: Exception) -> JSONResponse:
    return detail_response(answer_for(exc))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for error in exc.errors():
        loc = [part if isinstance(part, int) else printable(str(part)) for part in error.get("loc", ())]
        item = {"loc": loc, "msg": printable(str(error.get("msg", ""))), "type": error.get("type", "")}
        if "input" in error and _safe_input(error["input"]) is not None:
            item["input"] = _safe_input(error["input"])
        detail.append(item)
    return JSONResponse(status_code=422, content={"detail": detail})


def _safe_input(value):
    """The offending input, echoed only when it is a small JSON-safe scalar (never NaN or a huge string)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str):
        return printable(value if len(value) <= 100 else value[:100] + "...")
    return None


def printable(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the client must not break the error reply."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
