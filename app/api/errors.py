"""Every error of the request path and the HTTP answer it gets: one table.

Replies are JSON that always encodes (a lone surrogate or a NaN from the client must not turn a 422
into a 500), in FastAPI's own 422 shape for field errors, so clients parse one format.
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import (
    ClientGone,
    GenerationOutOfMemory,
    InvalidRequest,
    LoraNotFound,
    LoraUnavailable,
    QueueFull,
    QueueTimeout,
    ServiceUnavailable,
)
from app.lora.registry import InvalidLoraId, UnsafeLoraPath

RETRY_AFTER_S = "5"


def _field_error(field: str, message: str, kind: str = "value_error") -> dict:
    return {"detail": [{"loc": ["body", field], "msg": message, "type": kind}]}


# exception type -> (status, body, headers); the first matching entry answers (subclasses first).
ERROR_TABLE: list[tuple[type[Exception], object]] = [
    (InvalidRequest, lambda e: (422, _field_error(e.field, str(e)), None)),
    (InvalidLoraId, lambda e: (422, _field_error(e.field, str(e)), None)),
    (UnsafeLoraPath, lambda e: (422, _field_error("brand_id", str(e)), None)),
    (LoraUnavailable, lambda e: (422, _field_error("brand_id", str(e), "lora_unavailable"), None)),
    (LoraNotFound, lambda e: (404, {"detail": str(e)}, None)),
    (QueueFull, lambda e: (429, {"detail": f"the service is busy: {e}"}, {"Retry-After": str(e.retry_after_s)})),
    (QueueTimeout, lambda e: (503, {"detail": str(e)}, {"Retry-After": RETRY_AFTER_S})),
    (ServiceUnavailable, lambda e: (503, {"detail": str(e)}, {"Retry-After": RETRY_AFTER_S})),
    (ClientGone, lambda e: (499, {"detail": "the client closed the connection"}, None)),
    (
        GenerationOutOfMemory,
        lambda e: (503, {"detail": f"the GPU ran out of memory for this request ({e}); try a smaller size"},
                   {"Retry-After": RETRY_AFTER_S}),
    ),
]  # fmt: skip


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type, answer in ERROR_TABLE:
        app.add_exception_handler(exc_type, _handler(answer))


def _handler(answer):
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        status, body, headers = answer(exc)
        return JSONResponse(status_code=status, content=body, headers=headers)

    return handle


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
