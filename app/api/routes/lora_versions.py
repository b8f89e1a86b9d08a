"""`POST /lora/{brand_id}/versions` (upload) and `DELETE /lora/{brand_id}/versions/{version}`.

The multipart body is parsed as it streams (python-multipart's parser, not FastAPI's form reader,
which would spool the whole file to /tmp first): the `file` part goes straight into the upload's
temporary file in the brand folder and reading stops at LORA_MAX_FILE_MB (413), with or without a
Content-Length. These paths are exempt from MAX_BODY_BYTES and need the admin key when
ADMIN_API_KEY is set (app/api/security.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from app.api.deps import LorasDep
from app.lora.registry import ID_PATTERN, LORA_SUFFIX, METADATA_MAX_BYTES, UNSUPPORTED_SUFFIXES
from app.lora.safetensors_header import MIB
from app.lora.uploads import LoraUploads, PendingUpload, UploadRefused, parse_metadata, validate_version
from app.observability import audit

router = APIRouter(prefix="/lora", tags=["lora"])

BrandPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern, description="the brand's folder name")]
VersionPath = Annotated[str, PathParam(pattern=ID_PATTERN.pattern, description="v1, v2, ...")]
FORM_FIELDS = ("file", "metadata", "version")
MAX_FIELD_BYTES = METADATA_MAX_BYTES
MAX_PARTS = 8


class UploadPublic(BaseModel):
    brand_id: str
    version: str
    file: str
    sha256: str
    size_bytes: int
    format: str
    rank: int | None


def multipart_body(required: str, properties: dict) -> dict:
    """The OpenAPI request body of a streamed multipart form (the route parses it itself)."""
    schema = {"type": "object", "required": [required], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


UPLOAD_BODY = multipart_body(
    "file",
    {
        "file": {"type": "string", "format": "binary", "description": "a .safetensors LoRA"},
        "metadata": {"type": "string", "description": "a JSON object (kept as metadata.json)"},
        "version": {"type": "string", "description": "vN; default: the next number"},
    },
)


def _uploads(loras) -> LoraUploads:
    # The engine's real loader is the check (layers and shapes that fit the model); the factors it
    # makes are dropped at once: the new version is loaded like any other on its first request.
    return LoraUploads(loras.registry, loras.facts.max_file_bytes, lambda path: loras.engine.load_adapter(path))


@router.post(
    "/{brand_id}/versions", status_code=201, response_model=UploadPublic, openapi_extra=UPLOAD_BODY,
    responses={409: {"description": "the version exists"}, 413: {"description": "file too large"}},
)  # fmt: skip
async def upload_version(brand_id: BrandPath, request: Request, loras: LorasDep):
    result = await _receive(brand_id, request, _uploads(loras))
    # A flat 'default' file of this brand is shadowed now (version folders win): drop it from the cache.
    loras.cache.remove(brand_id)
    # The upload hashed the bytes as they streamed in: its first request does not hash them again.
    published = loras.registry.resolve(brand_id, result.version)
    if published is not None:
        loras.facts.record_sha256(published, result.fingerprint, result.sha256)
    audit("upload", brand_id, result.version, result.sha256)
    return JSONResponse(status_code=201, content=UploadPublic(**vars(result)).model_dump())


@router.delete("/{brand_id}/versions/{version}", status_code=204, responses={404: {"description": "no such version"}})
async def delete_version(brand_id: BrandPath, version: VersionPath, loras: LorasDep):
    doomed = loras.registry.resolve(brand_id, version) if version != "default" else None
    sha256 = await run_in_threadpool(loras.facts.sha256, doomed) if doomed is not None else None
    key = await run_in_threadpool(_uploads(loras).delete, brand_id, version)
    audit("delete", brand_id, version, sha256)
    loras.cache.remove(key)  # its weights leave the engine (a request holding them still finishes)
    return Response(status_code=204)


async def _receive(brand_id: str, request: Request, uploads: LoraUploads):
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(422, "send multipart/form-data with a 'file' part (a .safetensors LoRA) "
                                 "and optional 'metadata' (JSON object) and 'version' (vN) fields", "file")  # fmt: skip
    declared = request.headers.get("content-length")
    slack = 2 * MAX_FIELD_BYTES + 64 * 1024  # the other fields and the multipart framing
    if declared is not None and declared.isdigit() and int(declared) > uploads.max_file_bytes + slack:
        raise UploadRefused(413, f"request is larger than the file limit of {uploads.max_file_bytes // MIB} MB "
                                 "(LORA_MAX_FILE_MB)", "file")  # fmt: skip
    form = _StreamingForm(brand_id, uploads)
    try:
        await stream_form(request, boundary, form)
        if form.pending is None:
            raise UploadRefused(422, "the 'file' part is missing: send the LoRA as a file field named 'file'", "file")
        if not form.done_file:
            raise UploadRefused(422, "the upload ended before the 'file' part was complete", "file")
        version = form.fields.get("version")
        metadata = form.fields.get("metadata")
        version = validate_version(version.strip()) if version is not None else None
        meta = parse_metadata(metadata) if metadata is not None and metadata.strip() else None
        if version is not None and uploads.exists(brand_id, version):
            raise UploadRefused(409, f"version {version!r} of {brand_id!r} already exists", "version")
        pending, form.pending = form.pending, None
        return await run_in_threadpool(uploads.finish, brand_id, pending, version, meta)
    finally:
        if form.pending is not None:
            form.pending.abort()


async def stream_form(request: Request, boundary: bytes, form: _StreamingForm) -> None:
    """Feed the body to python-multipart as it arrives; the form's first error is raised (reading stops)."""
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            form.raise_pending()
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadRefused(422, f"the multipart body is malformed: {exc}", form.FILE_FIELD) from None
    form.raise_pending()


class _StreamingForm:
    """Callbacks for python-multipart: the file part streams to disk, small fields are collected.

    Subclasses (the training endpoint's dataset upload) set FILE_FIELD / FIELDS and `_open_file`.
    """

    FILE_FIELD = "file"
    FIELDS = FORM_FIELDS

    def __init__(self, brand_id: str, uploads: LoraUploads | None):
        self.brand_id = brand_id
        self.uploads = uploads
        self.pending: PendingUpload | None = None
        self.done_file = False
        self.fields: dict[str, str] = {}
        self.error: BaseException | None = None
        self._parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buffer = bytearray()

    def raise_pending(self) -> None:
        if self.error is not None:
            raise self.error

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._guard(self._headers_finished),
            "on_part_data": self._guard(self._part_data),
            "on_part_end": self._guard(self._part_end),
        }

    def _guard(self, fn):
        # An error inside a callback is kept and raised after `write` returns (and further data ignored).
        def call(*args):
            if self.error is None:
                try:
                    fn(*args)
                except (UploadRefused, OSError, ValueError) as exc:
                    self.error = exc

        return call

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._buffer = {}, None, bytearray()
        self._parts += 1

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        allowed, file_field = ", ".join(self.FIELDS), self.FILE_FIELD
        if self._parts > MAX_PARTS:
            raise UploadRefused(422, f"too many form parts; send only {allowed}", file_field)
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.FIELDS:
            raise UploadRefused(422, f"unknown form field {name!r}; allowed: {allowed}", name or file_field)
        if name in self.fields or (name == file_field and self.pending is not None):
            raise UploadRefused(422, f"form field {name!r} is given twice", name)
        self._name = name
        if name == file_field:
            self.pending = self._open_file(params.get(b"filename", b"").decode("utf-8", "replace"))

    def _open_file(self, filename: str):
        """Check the file part's name and return where its bytes go (`write`, `abort`)."""
        lower = filename.lower()
        if lower.endswith(UNSUPPORTED_SUFFIXES):
            raise UploadRefused(422, f"{filename!r} is a pickle format that can run code when loaded; "
                                     "only .safetensors files are accepted (convert it first)", "file")  # fmt: skip
        if not lower.endswith(LORA_SUFFIX):
            raise UploadRefused(422, f"file {filename!r} must be a .safetensors file", "file")
        return self.uploads.begin(self.brand_id)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == self.FILE_FIELD:
            self.pending.write(data[start:end])
        else:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                message = f"form field {self._name!r} is larger than {MAX_FIELD_BYTES} bytes"
                raise UploadRefused(422, message, self._name)

    def _part_end(self) -> None:
        if self._name == self.FILE_FIELD:
            self.done_file = True
        elif self._name is not None:
            try:
                self.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadRefused(422, f"form field {self._name!r} is not UTF-8 text", self._name) from None
