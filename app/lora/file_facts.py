"""What is known about each LoRA file, remembered per file fingerprint. No torch.

One memo for everything derived from a file's bytes: its sha256, its header facts (or why the header
is refused) and why it failed to load, if it did. An entry is valid while the file's fingerprint
(size, mtime, inode) is unchanged, so a replaced file is hashed and checked again, once. Each version
is hashed once: by the start-up pass (`learn`), a listing, an upload, or the loader's first read (`record_sha256`);
a later read of the same version skips the hash.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.lora.registry import Fingerprint, LoraFile, fingerprint_of
from app.lora.safetensors_header import InvalidLoraFile, LoraHeaderInfo, read_lora_header

HASH_CHUNK_BYTES = 1024 * 1024


@dataclass
class _Facts:
    fingerprint: Fingerprint
    sha256: str | None = None
    header: LoraHeaderInfo | None = None
    header_error: str | None = None
    header_read: bool = False
    load_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class LoraFileFacts:
    def __init__(self, max_file_bytes: int):
        self.max_file_bytes = max_file_bytes
        self._facts: dict[Path, _Facts] = {}  # one entry per path: replacements do not pile up
        self._lock = threading.Lock()

    def _entry(self, lora_file: LoraFile) -> _Facts:
        with self._lock:
            facts = self._facts.get(lora_file.path)
            if facts is None or facts.fingerprint != lora_file.fingerprint:
                facts = self._facts[lora_file.path] = _Facts(lora_file.fingerprint)
            return facts

    def sha256(self, lora_file: LoraFile) -> str:
        """sha256 of the file, read once per fingerprint (a big file blocks only lookups of itself)."""
        facts = self._entry(lora_file)
        with facts.lock:
            if facts.sha256 is None:
                digest, read_fingerprint = _hash_file(lora_file.path)
                if read_fingerprint != lora_file.fingerprint:
                    return digest  # replaced since it was resolved: right for these bytes, not for the entry
                facts.sha256 = digest
            return facts.sha256

    def known_sha256(self, lora_file: LoraFile) -> str | None:
        """The sha256 when this version of the file was hashed already; never reads the file."""
        with self._lock:
            facts = self._facts.get(lora_file.path)
        return facts.sha256 if facts is not None and facts.fingerprint == lora_file.fingerprint else None

    def record_sha256(self, lora_file: LoraFile, read_fingerprint: Fingerprint, digest: str) -> None:
        """Remember a digest hashed elsewhere (by the loader), if it was of this version of the file."""
        if read_fingerprint == lora_file.fingerprint:
            facts = self._entry(lora_file)
            with facts.lock:
                facts.sha256 = digest

    def learn(self, files: Iterable[LoraFile], stop: threading.Event) -> int:
        """Read the header and sha256 of each file not known yet, until `stop` is set; returns how
        many files were hashed. Runs beside the service at start-up, so that a file's first cache miss
        neither hashes it nor reads its header on the request path."""
        hashed = 0
        for lora_file in files:
            if stop.is_set():
                break
            if self.known_sha256(lora_file) is None:
                self.header(lora_file)
                try:
                    self.sha256(lora_file)
                except OSError:
                    continue  # deleted or unreadable meanwhile: its first miss reports it
                hashed += 1
        return hashed

    def header(self, lora_file: LoraFile) -> tuple[LoraHeaderInfo | None, str | None]:
        """(facts, None) or (None, why the file is refused): the safety gate, read once per fingerprint."""
        facts = self._entry(lora_file)
        with facts.lock:
            if not facts.header_read:
                try:
                    facts.header = read_lora_header(lora_file.path, self.max_file_bytes)
                except (InvalidLoraFile, OSError) as exc:
                    facts.header_error = str(exc)
                facts.header_read = True
            return facts.header, facts.header_error

    def mark_invalid(self, lora_file: LoraFile, reason: str) -> None:
        """Remember that this exact file failed to load, so it fails fast until it changes."""
        self._entry(lora_file).load_error = reason

    def clear_invalid(self, lora_file: LoraFile) -> None:
        self._entry(lora_file).load_error = None

    def invalid_reason(self, lora_file: LoraFile) -> str | None:
        """Why this exact file cannot be used (header refused or load failed); None when it is fine or untried."""
        with self._lock:
            facts = self._facts.get(lora_file.path)
        if facts is None or facts.fingerprint != lora_file.fingerprint:
            return None
        return facts.header_error or facts.load_error

    def invalid_count(self) -> int:
        with self._lock:
            return sum(1 for f in self._facts.values() if f.header_error or f.load_error)


def _hash_file(path: Path) -> tuple[str, Fingerprint]:
    """sha256 of the file and the fingerprint of the bytes actually read (taken from the open fd)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest(), fingerprint_of(st)
