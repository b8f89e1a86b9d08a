"""LoRA uploads and removal on disk, with the same checks as loading.

An upload streams into a hidden temporary file in the brand's folder (`.upload-XXXX.safetensors`,
which the registry ignores), bounded by LORA_MAX_FILE_MB while it streams. It must pass the header
gate (`read_lora_header`: safetensors only, floating dtypes, size) and the engine's real loader
(layers and shapes that fit the model; loaded, then dropped). Only then is a fresh version folder
created (`os.mkdir`: two uploads can never take the same version), its `metadata.json` written, and
the file renamed into it as `style.safetensors` — one atomic rename, so a request sees either no
version or the complete one. Any failure removes the temporary file (and a brand folder the upload
created), leaving nothing on disk.

Versions: without `version`, an upload becomes the next number after the highest `vN` folder (v1
for a brand without version folders). Version folders win over a flat `style.safetensors`
("default"), so an upload to such a brand becomes its latest and the flat file is no longer served
(move it into `v1/` first to keep it reachable). Removal renames the version folder to a hidden name
first (it disappears atomically), then deletes it.

Torch-free: the engine check is passed in as a callable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.lora.registry import (
    DEFAULT_VERSION,
    METADATA_MAX_BYTES,
    METADATA_NAME,
    VERSION_PATTERN,
    Fingerprint,
    LoraRegistry,
    UnsafeLoraPath,
    fingerprint_of,
    validate_lora_id,
)
from app.lora.safetensors_header import InvalidLoraFile, read_lora_header

UPLOAD_FILE_NAME = "style.safetensors"
UPLOAD_PREFIX = ".upload-"
# The paths of these endpoints, for the auth table and the JSON body limit (uploads are exempt from it).
UPLOAD_PATH = re.compile(r"^/lora/[^/]+/versions$")
VERSION_PATH = re.compile(r"^/lora/[^/]+/versions/[^/]+$")
TRAIN_PATH = re.compile(r"^/lora/[^/]+/train$")  # a training dataset (zip), bounded by TRAIN_MAX_DATASET_MB
TRAIN_JOB_PATH = re.compile(r"^/train/jobs/[^/]+$")
# POSTs whose body streams to disk under their own size limit instead of MAX_BODY_BYTES.
STREAMED_UPLOAD_PATHS = (UPLOAD_PATH, TRAIN_PATH)


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and any(pattern.fullmatch(path) for pattern in STREAMED_UPLOAD_PATHS)


class UploadRefused(Exception):
    """An upload or removal that cannot be done; `status` is the HTTP status, `field` the culprit."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class UploadResult:
    brand_id: str
    version: str
    file: str  # relative to the LoRA root
    sha256: str
    size_bytes: int
    format: str
    rank: int | None
    fingerprint: Fingerprint  # of the published file: the version `sha256` is the hash of


def validate_version(version: str) -> str:
    validate_lora_id(version, field="version")
    if not VERSION_PATTERN.fullmatch(version):
        raise UploadRefused(422, f"version {version!r} is not valid: use v1, v2, ... (a 'v' and a number)", "version")
    return version


def parse_metadata(text: str) -> dict:
    if len(text.encode("utf-8")) > METADATA_MAX_BYTES:
        raise UploadRefused(422, f"metadata is larger than {METADATA_MAX_BYTES} bytes", "metadata")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UploadRefused(422, f"metadata is not valid JSON: {exc}", "metadata") from None
    if not isinstance(value, dict):
        raise UploadRefused(422, f"metadata must be a JSON object, found {type(value).__name__}", "metadata")
    return value


class PendingUpload:
    """The temporary file an upload streams into; `write` refuses bytes beyond the limit."""

    def __init__(self, brand_dir: Path, created_brand_dir: bool, max_bytes: int):
        self.brand_dir = brand_dir
        self.created_brand_dir = created_brand_dir
        self.max_bytes = max_bytes
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=".safetensors", dir=brand_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.fingerprint: Fingerprint | None = None  # set by close()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadRefused(413, f"file is larger than the limit of {self.max_bytes // (1024 * 1024)} MB "
                                     "(LORA_MAX_FILE_MB)", "file")  # fmt: skip
        self._hash.update(data)
        self._file.write(data)

    def close(self) -> str:
        """Flush to disk; returns the sha256 (of the bytes whose fingerprint is `self.fingerprint`)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.fingerprint = fingerprint_of(os.fstat(self._file.fileno()))  # kept by the rename that publishes it
            self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        if self.created_brand_dir:
            try:
                self.brand_dir.rmdir()  # only if still empty
            except OSError:
                pass


class LoraUploads:
    def __init__(self, registry: LoraRegistry, max_file_bytes: int, check_loadable: Callable[[Path], None]):
        self.registry = registry
        self.max_file_bytes = max_file_bytes
        self.check_loadable = check_loadable  # the engine's real loader; raises on a file it refuses

    def _brand_dir(self, brand_id: str) -> Path:
        validate_lora_id(brand_id)
        brand_dir = self.registry.root / brand_id
        real = os.path.realpath(brand_dir)
        if os.path.commonpath([str(self.registry.root), real]) != str(self.registry.root) or (
            brand_dir.exists() and Path(real) != brand_dir
        ):
            raise UnsafeLoraPath(f"LoRA path for brand {brand_id!r} leads outside the LoRA root")
        return brand_dir

    def begin(self, brand_id: str) -> PendingUpload:
        brand_dir = self._brand_dir(brand_id)
        self.registry.root.mkdir(parents=True, exist_ok=True)
        try:
            brand_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
        if not brand_dir.is_dir():
            raise UploadRefused(409, f"{brand_id!r} exists in the LoRA folder but is not a folder", "brand_id")
        return PendingUpload(brand_dir, created, self.max_file_bytes)

    def finish(
        self,
        brand_id: str,
        pending: PendingUpload,
        version: str | None,
        metadata: dict | None,
        extras: dict[str, Path] | None = None,
    ) -> UploadResult:
        """Check the streamed file and publish it as a version. On any failure nothing stays on disk.

        `extras` (relative name -> file, e.g. a trained LoRA's `samples/seed-0.png`) are moved into
        the version folder with the metadata, before the LoRA file: the version is complete when it appears.
        """
        try:
            sha256 = pending.close()
            if pending.size == 0:
                raise UploadRefused(422, "file is empty (0 bytes)", "file")
            try:
                header = read_lora_header(pending.path, self.max_file_bytes)
            except InvalidLoraFile as exc:
                raise UploadRefused(422, f"file refused: {exc}", "file") from None
            try:
                self.check_loadable(pending.path)
            except Exception as exc:  # the loader's reason (layers that do not fit, NaN, ...) goes to the client
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UploadRefused(422, f"file refused: {reason[:300]}", "file") from None
            version_dir, version = self._new_version_dir(pending.brand_dir, version)
            try:
                if metadata is not None:
                    _write_json(version_dir / METADATA_NAME, metadata)
                for name, source in (extras or {}).items():
                    target = version_dir / name
                    if not target.resolve().is_relative_to(version_dir.resolve()) or name == UPLOAD_FILE_NAME:
                        raise ValueError(f"extra file name {name!r} is not allowed")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(source, target)
                os.replace(pending.path, version_dir / UPLOAD_FILE_NAME)  # the version appears here, complete
            except BaseException:
                shutil.rmtree(version_dir, ignore_errors=True)
                raise
        except BaseException:
            pending.abort()
            raise
        return UploadResult(
            brand_id=brand_id,
            version=version,
            file=f"{brand_id}/{version}/{UPLOAD_FILE_NAME}",
            sha256=sha256,
            size_bytes=pending.size,
            format=header.format,
            rank=header.rank,
            fingerprint=pending.fingerprint,
        )

    def exists(self, brand_id: str, version: str) -> bool:
        return (self._brand_dir(brand_id) / validate_version(version)).exists()

    def _new_version_dir(self, brand_dir: Path, version: str | None) -> tuple[Path, str]:
        if version is not None:
            path = brand_dir / validate_version(version)
            try:
                path.mkdir()
            except FileExistsError:
                raise UploadRefused(409, f"version {version!r} of {brand_dir.name!r} already exists; "
                                         "upload without `version` for the next number, or delete it first",
                                    "version") from None  # fmt: skip
            return path, version
        for _ in range(100):  # another upload may take the next number first
            number = 1 + max((int(m.group(1)) for m in map(VERSION_PATTERN.fullmatch, os.listdir(brand_dir)) if m),
                             default=0)  # fmt: skip
            path = brand_dir / f"v{number}"
            try:
                path.mkdir()
                return path, f"v{number}"
            except FileExistsError:
                continue
        raise UploadRefused(409, "could not pick a new version number; retry", "version")

    def delete(self, brand_id: str, version: str) -> str:
        """Remove one version folder; returns the cache key it had. 404 when there is no such version."""
        if version == DEFAULT_VERSION:
            raise UploadRefused(422, "only version folders (v1, v2, ...) can be deleted here; the flat "
                                     "'default' file is managed on disk", "version")  # fmt: skip
        brand_dir = self._brand_dir(brand_id)
        version_dir = brand_dir / validate_version(version)
        lora_file = self.registry.resolve(brand_id, version)
        if lora_file is None or not version_dir.is_dir():
            versions = self.registry.versions(brand_id) if brand_dir.is_dir() else []
            known = f"; versions: {', '.join(versions)}" if versions else "; the brand has no versions"
            raise UploadRefused(404, f"LoRA {brand_id!r} has no version {version!r}{known}", "version")
        hidden = brand_dir / f".deleted-{version}-{secrets.token_hex(4)}"
        if version_dir.is_symlink():
            version_dir.unlink()
        else:
            os.rename(version_dir, hidden)  # the version disappears at once; then its files are removed
            shutil.rmtree(hidden, ignore_errors=True)
        return lora_file.key


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
