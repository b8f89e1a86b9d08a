"""Webhooks: which URLs may be called, the signature, and delivery with retries.

Only hosts listed in WEBHOOK_ALLOWED_HOSTS may be called (the service must not become a way to reach
internal addresses), redirects are not followed (a listed host could otherwise bounce the request
elsewhere), and every body is signed: `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

from app.errors import InvalidRequest

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Webhook-Signature"
RETRIES = 3
TIMEOUT_S = 10.0


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_webhook_url(url: str, allowed_hosts: list[str], has_secret: bool) -> str:
    """The URL when it may be called, else InvalidRequest("webhook_url", why and how to allow it)."""
    if not allowed_hosts:
        raise InvalidRequest(
            "webhook_url",
            "webhooks are off: list the hosts they may call in WEBHOOK_ALLOWED_HOSTS (comma-separated, e.g. "
            "'hooks.example.com,ci.example.com:8443') and set WEBHOOK_SECRET",
        )
    if not has_secret:
        raise InvalidRequest("webhook_url", "webhooks need WEBHOOK_SECRET (the key of X-Webhook-Signature)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook_url", f"webhook_url must be an http:// or https:// URL with a host, not {url!r}")
    if parts.username or parts.password:
        raise InvalidRequest("webhook_url", "webhook_url must not carry credentials")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest("webhook_url", f"webhook_url has an invalid port: {url!r}") from None
    if host not in allowed_hosts and f"{host}:{port}" not in allowed_hosts:
        raise InvalidRequest(
            "webhook_url",
            f"host {host}:{port} is not allowed for webhooks; allowed (WEBHOOK_ALLOWED_HOSTS): "
            + ", ".join(allowed_hosts),
        )
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx is an answer like any other non-2xx: the delivery failed


_opener = urllib.request.build_opener(_NoRedirects)


def post_once(url: str, body: bytes, signature: str) -> int:
    """POST the body; the HTTP status (a 3xx or an error raises)."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature, "User-Agent": "brand-image-service"},
    )
    with _opener.open(request, timeout=TIMEOUT_S) as response:
        return response.status


async def deliver(
    url: str, body: bytes, secret: str, backoff_s: float, on_attempt: Callable[[int, bool], None]
) -> bool:
    """POST `body` to `url`: once, then up to RETRIES more times after an error or a non-2xx answer,
    waiting `backoff_s`, then twice and four times that. `on_attempt(attempts, delivered)` after each."""
    signature = sign(body, secret)
    for attempt in range(1, RETRIES + 2):
        try:
            status = await asyncio.to_thread(post_once, url, body, signature)
            delivered, why = 200 <= status < 300, f"status {status}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            delivered, why = False, f"{type(exc).__name__}: {exc}"
        on_attempt(attempt, delivered)
        if delivered:
            return True
        logger.warning("webhook %s attempt %d failed (%s)", url, attempt, why)
        if attempt <= RETRIES:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
    return False
