"""Optional bearer-key auth: API_KEY for the API, ADMIN_API_KEY for operations that change state.

401 = no key or a wrong key; 403 = a valid user key on an admin endpoint. Keys are compared in
constant time.
"""

from __future__ import annotations

import hmac
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.lora.uploads import TRAIN_JOB_PATH, TRAIN_PATH, UPLOAD_PATH, VERSION_PATH

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
# The A/B page is static HTML with no data in it; the API calls it makes carry the key.
PUBLIC_PAGES = frozenset({"/ui"})
ADMIN_ROUTES = frozenset({("POST", "/lora/cache/clear"), ("GET", "/train/jobs")})
# admin routes with path parameters, matched by method + pattern (uploads, removal, training jobs).
ADMIN_ROUTE_PATTERNS = (
    ("POST", UPLOAD_PATH),
    ("DELETE", VERSION_PATH),
    ("POST", TRAIN_PATH),
    ("GET", TRAIN_JOB_PATH),
    ("DELETE", TRAIN_JOB_PATH),
)


def _matches(given: str | None, expected) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(
        given.encode(), expected.get_secret_value().encode()
    )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.user_key = settings.api_key
        self.admin_key = settings.admin_api_key
        if self.user_key is None and self.admin_key is None:
            logger.warning("no API_KEY or ADMIN_API_KEY set: every endpoint is open to anyone who can reach it")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        denied = self._check(scope["method"], scope["path"], _bearer(scope))
        if denied is not None and scope["path"].startswith("/v1/"):
            denied = _openai_deny(denied)
        if denied is not None:
            return await denied(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, method: str, path: str, token: str | None) -> JSONResponse | None:
        if path in OPEN_PATHS or path in PUBLIC_PAGES:
            return None
        is_admin = _matches(token, self.admin_key)
        if _is_admin_route(method, path) and self.admin_key is not None:
            if is_admin:
                return None
            if _matches(token, self.user_key):
                return _deny(403, "this operation needs the admin key (ADMIN_API_KEY)")
            return _deny(401, "missing or wrong admin key: send 'Authorization: Bearer <ADMIN_API_KEY>'")
        if self.user_key is None or is_admin or _matches(token, self.user_key):
            return None
        if token is None:
            return _deny(401, "missing API key: send 'Authorization: Bearer <API_KEY>'")
        return _deny(401, "wrong API key")


def _deny(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message}, headers={"WWW-Authenticate": "Bearer"})


def _is_admin_route(method: str, path: str) -> bool:
    """the fixed admin routes plus those with path parameters."""
    return (method, path) in ADMIN_ROUTES or any(
        method == m and pattern.fullmatch(path) for m, pattern in ADMIN_ROUTE_PATTERNS
    )


def _openai_deny(denied: JSONResponse) -> JSONResponse:
    """the same refusal in OpenAI's shape, for /v1/ (OpenAI clients raise AuthenticationError)."""
    import json

    message = json.loads(denied.body)["detail"]
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(status_code=denied.status_code, content=body, headers={"WWW-Authenticate": "Bearer"})
