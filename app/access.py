"""Who is calling, and what they may do: the caller as a value, the key ring, quotas. No torch, no HTTP.

A presented key becomes a `Caller` once, at the edge (app/api/security.py); from then on the request
carries that value (`current_caller`). The one place a request's LoRA set is final
(`GenerationService.admit`) calls `check_brands`; a path that runs work later (a job accepted now)
calls `check_brands` at acceptance with the caller it was given, and may run the work inside
`acting_as(caller)`.

Keys are never stored: API_KEYS_FILE holds the sha256 of each key. A presented key is hashed and the
digest looked up in a dict, so no secret is ever compared character by character.

    [[key]]
    name = "acme-web"
    sha256 = "<hex sha256 of the key>"
    brands = ["acme", "acme-*"]       # brand ids or glob patterns; "*" = every brand
    roles = ["generate"]              # generate | publish | admin
    requests_per_minute = 60          # optional; absent or 0 = unlimited
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import hashlib
import logging
import math
import os
import re
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import BrandForbidden, RateLimited

logger = logging.getLogger("app.keyring")  # not "app.access": that is the access log

ROLES = ("generate", "publish", "admin")
# What each role grants: publish includes generate; admin includes everything, for every brand.
ROLE_GRANTS = {"generate": {"generate"}, "publish": {"generate", "publish"}, "admin": set(ROLES)}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BRAND_GLOB_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,128}$")
SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
KEY_FIELDS = {"name", "sha256", "brands", "roles", "requests_per_minute"}
RELOAD_CHECK_S = 1.0  # the file's mtime is looked at this often (the issue asks for at least every 2 s)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class TokenBucket:
    """`per_minute` tokens, refilled continuously; a full minute's worth may be spent at once."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.clock = clock
        self.at = clock()
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> float:
        """Take `n` tokens: 0.0 when taken, else the seconds until they would be there (nothing taken)."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now
            need = min(float(n), self.capacity)  # more than a minute's worth waits for a full bucket
            if self.tokens >= need:
                self.tokens -= need
                return 0.0
            return (need - self.tokens) / self.rate


@dataclass(frozen=True)
class Caller:
    """A caller, as the service knows it: a name (logs, metrics), brand patterns, roles, a rate."""

    name: str
    brands: tuple[str, ...]
    roles: frozenset[str]
    requests_per_minute: int = 0
    anonymous: bool = False  # no key was presented (the open mode, or only ADMIN_API_KEY set)
    bucket: TokenBucket | None = field(default=None, compare=False, repr=False)

    def has(self, role: str) -> bool:
        return any(role in ROLE_GRANTS[r] for r in self.roles)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def may_use(self, brand_id: str) -> bool:
        return self.is_admin or any(fnmatch.fnmatchcase(brand_id, pattern) for pattern in self.brands)

    def describe_roles(self) -> str:
        return ", ".join(sorted(self.roles)) or "none"


OPEN_CALLER = Caller("-", ("*",), frozenset(ROLES), anonymous=True)
ANONYMOUS_GENERATE = Caller("-", ("*",), frozenset({"generate"}), anonymous=True)

current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("current_caller", default=None)
# The request's quota: images it may still start on its own token (its first image is the request),
# and whether an image was refused for the rate (for the per-key metrics).
_request_quota: contextvars.ContextVar[dict | None] = contextvars.ContextVar("request_quota", default=None)


@contextlib.contextmanager
def acting_as(caller: Caller | None, credit: int = 0, quota: dict | None = None) -> Iterator[None]:
    """Run work as `caller` (the edge sets this for each request; a deferred job sets it for its run).

    `quota` (updated in place): {"credit": images already paid for, "limited": set on a 429}.
    """
    token = current_caller.set(caller)
    quota = quota if quota is not None else {}
    quota.update(credit=credit, limited=False)
    credit_token = _request_quota.set(quota)
    try:
        yield
    finally:
        _request_quota.reset(credit_token)
        current_caller.reset(token)


def check_brands(caller: Caller | None, loras: Iterable) -> None:
    """Refuse (403 naming the brand) a LoRA set with a brand outside the caller's patterns.

    `loras` are `LoraSpec`s (anything with `brand_id`). None = work the service started itself.
    """
    if caller is None:
        return
    for spec in loras:
        if not caller.may_use(spec.brand_id):
            raise BrandForbidden(spec.brand_id, caller.name)


def charge_images(caller: Caller | None, images: int) -> None:
    """Pay for `images` images about to start: from what the request already paid (its own token pays
    for its first image; `prepay_images` for more), the rest from the caller's bucket.

    Raises RateLimited with nothing taken when the bucket has too few: no queue place, no image.
    """
    _pay(caller, images, consume=True)


def prepay_images(caller: Caller | None, images: int) -> None:
    """Make sure the request has paid for `images` images before its first starts (an endpoint that
    makes several images one by one: all of them are refused at once, or none)."""
    _pay(caller, images, consume=False)


def _pay(caller: Caller | None, images: int, consume: bool) -> None:
    if caller is None or caller.bucket is None or images <= 0:
        return
    quota = _request_quota.get()
    paid = quota["credit"] if quota is not None else 0
    wait = caller.bucket.take(images - paid) if images > paid else 0.0
    if wait > 0:
        if quota is not None:
            quota["limited"] = True
        raise RateLimited(caller.name, caller.requests_per_minute, math.ceil(wait))
    if quota is not None:
        quota["credit"] = max(paid, images) - images if consume else max(paid, images)


class KeysFileError(ValueError):
    """API_KEYS_FILE cannot be used; the message names the line."""


def parse_keys(text: str, source: str = "API_KEYS_FILE") -> list[tuple[str, Caller]]:
    """(sha256, Caller) for each [[key]] of the TOML text; raises KeysFileError naming the line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"key"})
    if unknown:
        raise KeysFileError(f"{source}: unknown top-level entry {unknown[0]!r} (line {_line_of(text, unknown[0])}); "
                            "each key is a [[key]] table")  # fmt: skip
    tables = data.get("key", [])
    if not isinstance(tables, list) or not tables:
        raise KeysFileError(f"{source}: defines no [[key]] table")
    header_lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("[[key]]")]
    keys: list[tuple[str, Caller]] = []
    names: set[str] = set()
    for index, table in enumerate(tables):
        line = header_lines[index] if index < len(header_lines) else "?"

        def bad(message: str, line=line, index=index) -> KeysFileError:
            return KeysFileError(f"{source}: key #{index + 1} (the [[key]] at line {line}): {message}")

        extra = sorted(set(table) - KEY_FIELDS)
        if extra:
            raise bad(f"unknown field {extra[0]!r}; allowed: {', '.join(sorted(KEY_FIELDS))}")
        name, digest = table.get("name"), table.get("sha256")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise bad("name must be 1-64 letters, digits, '.', '_' or '-' (it is shown in logs and metrics)")
        if name in names:
            raise bad(f"name {name!r} is used twice")
        if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
            raise bad("sha256 must be the 64 hex digits of the key's sha256 (python -m app.keys new makes one)")
        brands, roles = table.get("brands"), table.get("roles")
        if not isinstance(brands, list) or not brands or not all(isinstance(b, str) for b in brands):
            raise bad('brands must be a non-empty list of brand ids or glob patterns, e.g. ["acme", "acme-*"]')
        for pattern in brands:
            if not BRAND_GLOB_PATTERN.fullmatch(pattern):
                raise bad(f"brand pattern {pattern!r} is not valid: use brand ids and *, ? or [...]")
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise bad(f"roles must be a non-empty list of {', '.join(ROLES)}; found {roles!r}")
        rate = table.get("requests_per_minute", 0)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
            raise bad(f"requests_per_minute must be a whole number >= 0 (0 = unlimited); found {rate!r}")
        names.add(name)
        keys.append((digest.lower(), Caller(name, tuple(brands), frozenset(roles), rate)))
    digests = [d for d, _ in keys]
    if len(set(digests)) != len(digests):
        raise KeysFileError(f"{source}: two keys have the same sha256")
    return keys


def _line_of(text: str, word: str) -> int | str:
    for i, line in enumerate(text.splitlines()):
        if line.strip().startswith(word):
            return i + 1
    return "?"


def parse_keys_file(path: Path) -> list[tuple[str, Caller]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{keys_file_label(path)}: cannot be read: {exc}") from None
    return parse_keys(text, keys_file_label(path))


def keys_file_label(path: Path) -> str:
    """How messages about the file start: `API_KEYS_FILE '/etc/keys.toml'`."""
    return f"API_KEYS_FILE {str(path)!r}"


class KeyRing:
    """sha256 -> Caller for API_KEYS_FILE and the legacy API_KEY / ADMIN_API_KEY; reloads the file when
    its mtime changes (a watcher thread) and on `reload()` (SIGHUP). A file that fails to parse keeps
    the last good set and logs the reason."""

    def __init__(self, path: Path | None, api_key: str | None = None, admin_api_key: str | None = None):
        self.path = Path(path) if path is not None else None
        self._legacy: dict[str, Caller] = {}
        if api_key:
            self._legacy[key_digest(api_key)] = Caller("API_KEY", ("*",), frozenset({"generate"}))
        if admin_api_key:
            self._legacy[key_digest(admin_api_key)] = Caller("ADMIN_API_KEY", ("*",), frozenset({"admin"}))
        self._keys: dict[str, Caller] = {}
        self._seen: tuple | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.path is not None:
            self._install(parse_keys_file(self.path), self._stat())  # a bad file at start is raised
        if api_key is None and self.path is None:
            # No key for the API: requests without a key are let in (as before keys existed).
            self.anonymous = OPEN_CALLER if admin_api_key is None else ANONYMOUS_GENERATE
        else:
            self.anonymous = None

    @property
    def is_open(self) -> bool:
        return self.anonymous is OPEN_CALLER

    def lookup(self, key: str | None) -> Caller | None:
        """The caller a presented key belongs to (hashed, then looked up), or None."""
        if not key:
            return None
        digest = key_digest(key)
        return self._keys.get(digest) or self._legacy.get(digest)

    def names(self) -> list[str]:
        return sorted(c.name for c in [*self._keys.values(), *self._legacy.values()])

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _install(self, keys: list[tuple[str, Caller]], seen: tuple | None) -> None:
        with self._lock:
            old = {c.name: c for c in self._keys.values()}
            fresh: dict[str, Caller] = {}
            for digest, caller in keys:
                before = old.get(caller.name)
                # A key keeps its bucket across reloads while its rate is unchanged.
                if (
                    before is not None
                    and before.bucket is not None
                    and before.requests_per_minute == (caller.requests_per_minute)
                ):
                    bucket = before.bucket
                else:
                    bucket = TokenBucket(caller.requests_per_minute) if caller.requests_per_minute else None
                fresh[digest] = Caller(caller.name, caller.brands, caller.roles, caller.requests_per_minute,
                                       bucket=bucket)  # fmt: skip
            self._keys = fresh
            self._seen = seen

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the file again; True when the new set is in use. A bad file keeps the last good set."""
        if self.path is None:
            return False
        seen = self._stat()
        try:
            keys = parse_keys_file(self.path)
        except KeysFileError as exc:
            self._seen = seen  # not retried until the file changes again
            logger.error("API_KEYS_FILE reload (%s) failed; keeping the last good %d keys: %s", reason,
                         len(self._keys), exc)  # fmt: skip
            return False
        self._install(keys, seen)
        logger.warning("API_KEYS_FILE reloaded (%s): %d keys: %s", reason, len(keys),
                       ", ".join(c.name for _, c in keys))  # fmt: skip
        return True

    def check_for_changes(self) -> None:
        if self.path is not None and self._stat() != self._seen:
            self.reload("the file changed")

    def start(self) -> None:
        """Watch the file's mtime in a background thread (every RELOAD_CHECK_S)."""
        if self.path is None or self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="api-keys-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def _watch(self) -> None:
        while not self._stop.wait(RELOAD_CHECK_S):
            try:
                self.check_for_changes()
            except Exception:  # the watcher must outlive a surprise; the last good keys stay
                logger.exception("API_KEYS_FILE check failed")
