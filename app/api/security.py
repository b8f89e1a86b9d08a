"""Keys at the edge: the presented key becomes a `Caller` once (app/access.py), and each route's role
and path brand are decided from one table (`ROUTE_ROLES`).

- `AuthMiddleware` (every request): `Authorization: Bearer KEY` (on `/sdapi/v1/*` also HTTP Basic
  with the key as the password, as AUTOMATIC1111 clients send it) is hashed and looked up in the key
  ring. No key or an unknown key: 401. A key over its rate: 429 with Retry-After, before the app
  runs (no queue place, no image). The caller is then the request's (`current_caller`, and
  `scope["app.caller"]` for the access log).
- `authorize` (an app-wide dependency, so every route gets it): the route's role from `ROUTE_ROLES`
  (a route not in the table needs `admin`), and a `{brand_id}` in its path must be one of the key's
  brands: a read of another brand is the same 404 as a missing brand; a change to one is a 403.
- The brands a request's body names are checked where its LoRA set is final:
  `GenerationService.admit` (app/service.py).

With no key configured at all (no API_KEYS_FILE, API_KEY or ADMIN_API_KEY) everything is open, as
before keys existed; with only ADMIN_API_KEY, requests without a key may generate and read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.access import Caller, KeyRing, acting_as
from app.errors import BrandForbidden, LoraNotFound, RoleMissing, Unauthenticated

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
# The A/B page is static HTML with no data in it, and its starting sizes; the API calls it makes carry the key.
PUBLIC_PAGES = frozenset({"/ui", "/ui/defaults"})
BASIC_AUTH_PREFIX = "/sdapi/v1/"

# (method, route path) -> the role it needs. A route missing here needs "admin": a new route is
# closed until someone decides who may use it. Brands in a route's body are checked by the service.
ROUTE_ROLES: dict[tuple[str, str], str] = {
    ("GET", "/"): "generate",
    ("POST", "/generate"): "generate",
    ("POST", "/v1/images/generations"): "generate",
    ("POST", "/ab-test"): "generate",
    ("GET", "/ab-test/{test_id}"): "generate",  # another brand's test: 404 (the route)
    ("POST", "/ab-test/{test_id}/choice"): "generate",
    ("GET", "/lora/{brand_id}/ab-results"): "generate",
    ("GET", "/lora/list"): "generate",  # filtered to the key's brands
    ("GET", "/lora/{brand_id}/metadata"): "generate",
    ("GET", "/lora/cache/stats"): "generate",  # cached / pinned filtered to the key's brands
    ("POST", "/lora/{brand_id}/versions"): "publish",
    ("DELETE", "/lora/{brand_id}/versions/{version}"): "publish",
    ("POST", "/lora/{brand_id}/train"): "publish",
    ("GET", "/train/jobs"): "publish",  # filtered to the key's brands
    ("GET", "/train/jobs/{job_id}"): "publish",  # another brand's job: 404 (the route)
    ("DELETE", "/train/jobs/{job_id}"): "publish",
    ("POST", "/lora/cache/clear"): "admin",
    ("GET", "/metrics"): "admin",
    # Image endpoints being added beside this one (their LoRA sets pass GenerationService.admit).
    ("POST", "/jobs"): "generate",
    # A key sees and cancels its own jobs (another key's job: 404); an admin key every job.
    ("GET", "/jobs"): "generate",
    ("GET", "/jobs/{job_id}"): "generate",
    ("GET", "/jobs/{job_id}/image"): "generate",
    ("GET", "/jobs/{job_id}/events"): "generate",
    ("DELETE", "/jobs/{job_id}"): "generate",
    ("POST", "/sdapi/v1/txt2img"): "generate",
    ("POST", "/sdapi/v1/img2img"): "generate",
    # AUTOMATIC1111's calls around them: /loras lists the key's brands; /progress and /interrupt see the
    # key's own requests (an admin key's: everyone's).
    ("GET", "/sdapi/v1/loras"): "generate",
    ("POST", "/sdapi/v1/refresh-loras"): "generate",
    ("GET", "/sdapi/v1/samplers"): "generate",
    ("GET", "/sdapi/v1/schedulers"): "generate",
    ("GET", "/sdapi/v1/sd-models"): "generate",
    ("GET", "/sdapi/v1/options"): "generate",
    ("POST", "/sdapi/v1/options"): "generate",  # it only accepts what is already so
    ("GET", "/sdapi/v1/scripts"): "generate",
    ("POST", "/sdapi/v1/png-info"): "generate",
    ("GET", "/sdapi/v1/progress"): "generate",
    ("POST", "/sdapi/v1/interrupt"): "generate",
    ("POST", "/v1/images/edits"): "generate",
}


def required_role(method: str, route_path: str) -> str:
    if method == "HEAD":
        method = "GET"
    return ROUTE_ROLES.get((method, route_path), "admin")


def request_caller(request: Request) -> Caller | None:
    """The caller the middleware made of the request's key (None on the open paths)."""
    return request.scope.get("app.caller")


async def authorize(request: Request) -> None:
    """The route's role and its path's brand (an app-wide dependency: it runs for every route)."""
    caller = request_caller(request)
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if caller is None or path is None:
        return
    role = required_role(request.method, path)
    if not caller.has(role):
        if caller.anonymous:
            raise Unauthenticated(f"missing API key: this operation needs a key with the {role!r} role "
                                  "(send 'Authorization: Bearer <key>')")  # fmt: skip
        raise RoleMissing(role, caller.name, caller.describe_roles())
    brand_id = request.path_params.get("brand_id")
    if brand_id is not None and not caller.may_use(brand_id):
        if request.method in ("GET", "HEAD"):
            raise LoraNotFound(unknown_brand_message(brand_id))  # the same answer as a brand that does not exist
        raise BrandForbidden(brand_id, caller.name)


def unknown_brand_message(brand_id: str) -> str:
    return f"no LoRA for brand_id {brand_id!r}"


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def presented_key(scope: Scope) -> str | None:
    """The key of `Authorization: Bearer KEY`, or on /sdapi/v1/* of `Basic base64(user:KEY)`."""
    header = _authorization(scope)
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        return token or None
    if scheme.lower() == "basic" and scope["path"].startswith(BASIC_AUTH_PREFIX) and token:
        try:
            _, sep, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app = app
        self.keys = keys
        if keys.is_open:
            logger.warning("no API_KEYS_FILE, API_KEY or ADMIN_API_KEY set: every endpoint is open to anyone who "
                           "can reach it")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"] in PUBLIC_PAGES:
            return await self.app(scope, receive, send)
        key = presented_key(scope)
        caller = self.keys.lookup(key)
        if caller is None:
            caller = self.keys.anonymous
        if caller is None:
            message = "wrong API key" if key else "missing API key: send 'Authorization: Bearer <key>'"
            return await _deny(scope, 401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        scope["app.caller"] = caller
        if caller.bucket is not None:
            wait = caller.bucket.take(1)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                scope["app.limited"] = True
                message = (f"key {caller.name!r} is over its limit of {caller.requests_per_minute} requests per "
                           f"minute (one image counts as one request); retry in {retry} s")  # fmt: skip
                return await _deny(scope, 429, message, {"Retry-After": str(retry)})(scope, receive, send)
        scope["app.quota"] = quota = {}
        with acting_as(caller, credit=1, quota=quota):  # the request's token pays for its first image
            await self.app(scope, receive, send)


def _deny(scope: Scope, status: int, message: str, headers: dict) -> JSONResponse:
    if scope["path"].startswith("/v1/"):  # OpenAI clients raise AuthenticationError / RateLimitError
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}[status]
        kind = {401: "authentication_error", 429: "rate_limit_error"}[status]
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(status_code=status, content=body, headers=headers)
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers)
