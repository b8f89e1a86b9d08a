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
    BrandForbidden,
    ClientGone,
    GenerationOutOfMemory,
    InvalidRequest,
    JobCanceled,
    LoraNotFound,
    LoraUnavailable,
    QueueFull,
    QueueTimeout,
    RateLimited,
    RoleMissing,
    ServiceUnavailable,
    Unauthenticated,
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
    BrandForbidden: lambda e: ErrorAnswer(403, str(e), kind="forbidden"),
    RoleMissing: lambda e: ErrorAnswer(403, str(e), kind="forbidden"),
    Unauthenticated: lambda e: ErrorAnswer(401, str(e), kind="unauthenticated", headers={"WWW-Authenticate": "Bearer"}),
    RateLimited: lambda e: ErrorAnswer(
        429, str(e), kind="rate_limit", headers={"Retry-After": str(e.retry_after_s)}
    ),
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


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    answer = answer_for(exc)
    if request.url.path.startswith("/v1/"):  # OpenAI clients read errors in OpenAI's shape
        return openai_response(answer)
    return detail_response(answer)


# The error table's kinds and statuses in OpenAI's terms.
OPENAI_CODES = {"rate_limit": "rate_limit_exceeded", "lora_unavailable": "lora_unavailable",
                "unauthenticated": "invalid_api_key", "forbidden": "forbidden"}  # fmt: skip
OPENAI_TYPES = {429: "rate_limit_error", 503: "server_error", 499: "server_error", 401: "authentication_error",
                403: "permission_error"}  # fmt: skip


def openai_response(answer: ErrorAnswer, params: dict[str, str] | None = None) -> JSONResponse:
    """The same answer in OpenAI's `{"error": {...}}` shape (a 422 is OpenAI's 400); `params` renames our
    fields to OpenAI's (`init_image` is `image` on the edits endpoint)."""
    param = "size" if answer.field in ("width", "height") else (params or {}).get(answer.field, answer.field)
    body = {
        "error": {
            "message": answer.message,
            "type": OPENAI_TYPES.get(answer.status, "invalid_request_error"),
            "param": param,
            "code": OPENAI_CODES.get(answer.kind, "invalid_value"),
        }
    }
    return JSONResponse(status_code=400 if answer.status == 422 else answer.status, content=body,
                        headers=answer.headers)  # fmt: skip


SEND_JSON = "send the request body as a JSON object with the header Content-Type: application/json"
# pydantic's and FastAPI's error types that are about the body as a whole (not a field, not a model rule).
WHOLE_BODY_ERRORS = {"json_invalid", "missing", "model_attributes_type", "dict_type", "model_type"}
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def body_problem(request: Request, error: dict) -> str | None:
    """What is wrong with the body as a whole (not JSON, no or another content type, not an object), or None
    when the error is about a field. FastAPI's own words ("JSON decode error", "valid dictionary") do not
    say what to send."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    if not loc or loc[0] != "body" or kind not in WHOLE_BODY_ERRORS or (len(loc) > 1 and kind != "json_invalid"):
        return None
    content_type = request.headers.get("content-type")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if not content_type:
        problem = "the request has no Content-Type header"
    elif media_type != "application/json" and not media_type.endswith("+json"):
        problem = f"its Content-Type is {printable(content_type)!r}"
    elif kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        problem = f"the body is not valid JSON ({printable(str(reason))}{where})"
    elif kind == "missing":
        problem = "the body is empty"
    else:
        value = error.get("input")
        kind_of_value = "null" if value is None else JSON_KINDS.get(type(value), "a JSON value")
        problem = f"the body is {kind_of_value}, not an object"
    return f"{SEND_JSON}: {problem}"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for error in exc.errors():
        problem = body_problem(request, error)
        if problem is not None:  # the body as a whole: one answer, nothing about fields
            return JSONResponse(
                status_code=422, content={"detail": [{"loc": ["body"], "msg": problem, "type": "body_not_json"}]}
            )
        loc = [part if isinstance(part, int) else printable(str(part)) for part in error.get("loc", ())]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):  # a rule across fields (e.g. an image check) names its field
            loc.append(cause.field)
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
