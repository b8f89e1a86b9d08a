"""What is known about each LoRA file, remembered per file fingerprint. No torch.

One memo for everything derived from a file's bytes: its sha256, its header facts (or why the header
is refused) and why it failed to load, if it did. An entry is valid while the file's fingerprint
(size, mtime, inode) is unchanged, so a replaced file is hashed and checked again, once; nothing is
hashed on a cache hit.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app.lora.registry import LoraFile
from app.lora.safetensors_header import InvalidLoraFile, LoraHeaderInfo, read_lora_header

HASH_CHUNK_BYTES = 1024 * 1024
Fingerprint = tuple[int, int, int]


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
    return digest.hexdigest(), (st.st_size, st.st_mtime_ns, st.st_ino)
