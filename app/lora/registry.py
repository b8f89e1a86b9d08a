"""What LoRA files are on disk: brand -> versions -> file.

Pure Python on purpose (no torch): the API and the cache can ask what exists without touching the
engine. Every path is built from a validated id, then resolved with realpath and checked to stay
inside the LoRA root, so a client-supplied name can never reach another file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^v(\d+)$", re.ASCII)  # ASCII: "\d" would also match other scripts' digits
DEFAULT_VERSION = "default"  # the brand folder holds the file directly, no version folders

# Looked up in this order inside a version folder (or the brand folder); "{brand_id}" is filled in.
FILE_NAMES_IN_ORDER = ("style.safetensors", "lora.safetensors", "{brand_id}.safetensors")
LORA_SUFFIX = ".safetensors"
# Pickle-based formats can run code when loaded, so they are listed for the operator, never loaded.
UNSUPPORTED_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
METADATA_NAME = "metadata.json"
METADATA_MAX_BYTES = 1024 * 1024  # a metadata file is a few hundred bytes; refuse to read a huge one

# The README written into a new LoRA folder: the one text of the folder layout, shipped with the package.
LORA_DIR_README = Path(__file__).with_name("LORA_FOLDER_README.md")


Fingerprint = tuple[int, int, int]  # (size, mtime_ns, inode)


def fingerprint_of(st: os.stat_result) -> Fingerprint:
    """Changes when the file is rewritten or replaced (a new inode), without reading it."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class InvalidLoraId(ValueError):
    """A brand id or version is not an allowed name; `field` says which."""

    def __init__(self, message: str, field: str = "brand_id"):
        super().__init__(message)
        self.field = field


class UnsafeLoraPath(ValueError):
    """A path (after following symlinks) leaves the LoRA root."""


def validate_lora_id(value: str, field: str = "brand_id") -> str:
    # fullmatch, not match: "$" also matches before a trailing newline.
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidLoraId(
            f"{field} {value!r} is not valid: it must match {ID_PATTERN.pattern} "
            "(letters, digits, '_', '.', '-'; at most 64 characters) and must not contain '..'",
            field,
        )
    return value


def _validate_version(version: str) -> str:
    validate_lora_id(version, field="version")
    if version != DEFAULT_VERSION and not VERSION_PATTERN.fullmatch(version):
        raise InvalidLoraId(
            f"version {version!r} is not valid: it must match {VERSION_PATTERN.pattern} "
            f"(v1, v2, ...) or be {DEFAULT_VERSION!r}",
            "version",
        )
    return version


@dataclass(frozen=True)
class LoraFile:
    brand_id: str
    version: str  # "v3" or "default"
    path: Path  # fully resolved, checked inside root
    size_bytes: int
    mtime_ns: int
    inode: int

    @property
    def fingerprint(self) -> Fingerprint:
        return (self.size_bytes, self.mtime_ns, self.inode)

    @property
    def key(self) -> str:
        """The cache key: the brand id, plus `@version` when the brand keeps version folders."""
        return self.brand_id if self.version == DEFAULT_VERSION else f"{self.brand_id}@{self.version}"


class LoraRegistry:
    def __init__(self, root: Path | str):
        self.root = Path(os.path.realpath(root))
        self._root_str = str(self.root)

    # -- layout ---------------------------------------------------------------------------------

    def ensure_root(self) -> None:
        """Create the LoRA folder and its README where possible; never fails (e.g. a read-only mount)."""
        readme = self.root / "README.md"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not readme.exists():
                readme.write_text(LORA_DIR_README.read_text(encoding="utf-8"), encoding="utf-8")
        except OSError as exc:
            if self.root.is_dir():
                logger.warning("LoRA folder %s is not writable (%s): its README.md was not written", self.root, exc)
            else:
                logger.warning("LoRA folder %s does not exist and could not be created (%s): no LoRAs", self.root, exc)

    def brand_ids(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        ids = []
        for entry in entries:
            if not ID_PATTERN.fullmatch(entry.name) or ".." in entry.name:
                continue  # hidden names fail the pattern too
            if not entry.is_dir() or not self._inside_root(os.path.realpath(entry.path)):
                continue
            ids.append(entry.name)
        return sorted(ids)

    def versions(self, brand_id: str) -> list[str]:
        brand_id = validate_lora_id(brand_id)
        brand_dir = self._brand_dir(brand_id)
        if brand_dir is None:
            return []
        dirs = self._version_dirs(brand_dir)
        found = [name for _, name in dirs if self._file_in(brand_dir / name, brand_id)]
        if found:
            return found
        return [DEFAULT_VERSION] if self._file_in(brand_dir, brand_id) else []

    def count(self) -> int:
        total = 0
        for brand_id in self.brand_ids():
            try:
                total += bool(self.versions(brand_id))
            except UnsafeLoraPath:
                continue  # a bad symlink makes that brand unusable, not the whole count
        return total

    def latest_files(self) -> Iterator[LoraFile]:
        """Each brand's latest file (what a request without a version gets); unusable brands are skipped."""
        for brand_id in self.brand_ids():
            try:
                lora_file = self.resolve(brand_id)
            except UnsafeLoraPath:
                continue
            if lora_file is not None:
                yield lora_file

    def resolve(self, brand_id: str, version: str | None = None) -> LoraFile | None:
        brand_id = validate_lora_id(brand_id)
        if version is not None:
            version = _validate_version(version)
        brand_dir = self._brand_dir(brand_id)
        if brand_dir is None:
            return None

        if version is None:
            # Latest: walk version folders from the highest number and stop at the first with a file.
            for _, name in reversed(self._version_dirs(brand_dir)):
                found = self._file_in(brand_dir / name, brand_id)
                if found is not None:
                    return self._lora_file(brand_id, name, found)
            found = self._file_in(brand_dir, brand_id)
            return self._lora_file(brand_id, DEFAULT_VERSION, found) if found else None

        if version == DEFAULT_VERSION:
            # "default" only exists when no version folder holds a file (version folders win).
            if any(self._file_in(brand_dir / name, brand_id) for _, name in self._version_dirs(brand_dir)):
                return None
            found = self._file_in(brand_dir, brand_id)
        else:
            found = self._file_in(brand_dir / version, brand_id)
        return self._lora_file(brand_id, version, found) if found else None

    def unsupported_files(self, brand_id: str) -> list[str]:
        """Pickle-format files in the brand folder and its version folders, as 'name' or 'v2/name'."""
        brand_id = validate_lora_id(brand_id)
        brand_dir = self._brand_dir(brand_id)
        if brand_dir is None:
            return []
        names = [name for name in self._file_names(brand_dir) if name.lower().endswith(UNSUPPORTED_SUFFIXES)]
        for _, version in self._version_dirs(brand_dir):
            version_dir = self._confined(brand_dir / version, brand_id)
            names += [
                f"{version}/{name}"
                for name in self._file_names(version_dir)
                if name.lower().endswith(UNSUPPORTED_SUFFIXES)
            ]
        return sorted(names)

    # -- file facts -----------------------------------------------------------------------------

    def metadata(self, lora_file: LoraFile) -> tuple[dict | None, str | None]:
        """(metadata, error); a missing file is (None, None); a broken one never raises."""
        validate_lora_id(lora_file.brand_id)
        _validate_version(lora_file.version)
        brand_dir = self.root / lora_file.brand_id
        candidates = [brand_dir / METADATA_NAME]
        if lora_file.version != DEFAULT_VERSION:
            candidates.insert(0, brand_dir / lora_file.version / METADATA_NAME)
        for candidate in candidates:
            if not candidate.is_file():
                continue
            real = os.path.realpath(candidate)
            if not self._inside_root(real):
                return None, f"{METADATA_NAME} of brand {lora_file.brand_id!r} leads outside the LoRA root"
            return _read_metadata(Path(real))
        return None, None

    # -- helpers --------------------------------------------------------------------------------

    def _inside_root(self, real_path: str) -> bool:
        return os.path.commonpath([self._root_str, real_path]) == self._root_str

    def _confined(self, path: Path, brand_id: str) -> Path:
        real = os.path.realpath(path)
        if not self._inside_root(real):
            # Name the brand, not the target: the target is none of the caller's business.
            raise UnsafeLoraPath(f"LoRA path for brand {brand_id!r} leads outside the LoRA root")
        return Path(real)

    def _brand_dir(self, brand_id: str) -> Path | None:
        """The brand folder as built from the id (not resolved), or None if absent; raises if unsafe."""
        brand_dir = self.root / brand_id
        self._confined(brand_dir, brand_id)
        return brand_dir if brand_dir.is_dir() else None

    def _version_dirs(self, brand_dir: Path) -> list[tuple[int, str]]:
        """(number, name) of version folders, ascending by number so v2 < v10."""
        found = []
        for name in self._entry_names(brand_dir):
            match = VERSION_PATTERN.fullmatch(name)
            if match and len(name) <= 64 and (brand_dir / name).is_dir():
                found.append((int(match.group(1)), name))
        return sorted(found)

    def _file_in(self, folder: Path, brand_id: str) -> Path | None:
        """The LoRA file in a folder by the lookup order, resolved and confined; None if none."""
        folder = self._confined(folder, brand_id)
        for pattern in FILE_NAMES_IN_ORDER:
            candidate = folder / pattern.format(brand_id=brand_id)
            if candidate.is_file():
                return self._confined(candidate, brand_id)
        named = {pattern.format(brand_id=brand_id) for pattern in FILE_NAMES_IN_ORDER}
        others = [
            name for name in self._file_names(folder) if name.endswith(LORA_SUFFIX) and name not in named
        ]
        # Two unnamed files would make the choice a guess, so neither is used.
        return self._confined(folder / others[0], brand_id) if len(others) == 1 else None

    def _lora_file(self, brand_id: str, version: str, path: Path) -> LoraFile | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # removed between lookup and stat
        return LoraFile(brand_id, version, path, st.st_size, st.st_mtime_ns, st.st_ino)

    @staticmethod
    def _entry_names(folder: Path) -> list[str]:
        try:
            return [name for name in os.listdir(folder) if not name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _file_names(self, folder: Path) -> list[str]:
        # Hidden files are skipped: partial uploads and macOS "._x.safetensors" companions live there.
        return sorted(name for name in self._entry_names(folder) if (folder / name).is_file())


def _read_metadata(path: Path) -> tuple[dict | None, str | None]:
    try:
        with open(path, "rb") as f:
            raw = f.read(METADATA_MAX_BYTES + 1)
    except OSError as exc:
        return None, f"{METADATA_NAME} could not be read: {exc.strerror or exc}"
    if len(raw) > METADATA_MAX_BYTES:
        return None, f"{METADATA_NAME} is larger than {METADATA_MAX_BYTES} bytes"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, f"{METADATA_NAME} is not UTF-8 text"
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"{METADATA_NAME} is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"{METADATA_NAME} must hold a JSON object, found {type(data).__name__}"
    return data, None
