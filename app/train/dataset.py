"""A training dataset on disk: images with captions, checked before any training starts (torch-free).

Two layouts, as diffusers' scripts and kohya accept them:

- every image has a caption file with the same name beside it (`001.png` + `001.txt`), in the folder
  or its subfolders;
- or a `metadata.jsonl` at the top: one JSON object per line with `file_name` (relative to the folder)
  and `text` (the caption).

Every image is opened (a file Pillow cannot decode is refused with its name), every caption must be
non-empty UTF-8 text. `dataset_sha256` identifies the data: sha256 over the sorted lines
`<relative name>\\t<sha256 of the image file>\\t<sha256 of the caption>`.

An uploaded zip is extracted by `extract_zip`, which refuses paths that escape the folder (`../`,
absolute, drive letters), links, too many members and more bytes than the limit, before any is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
MAX_CAPTION_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192x8192; Pillow's decompression-bomb guard is a warning below 2x its own
SKIPPED_DIRS = ("__MACOSX",)


class InvalidDataset(ValueError):
    """The dataset cannot be trained on; the message names the file and what is expected."""


@dataclass(frozen=True)
class Example:
    name: str  # relative to the dataset folder, '/'-separated
    path: Path
    caption: str


@dataclass(frozen=True)
class Dataset:
    root: Path
    examples: tuple[Example, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(root: Path | str, max_images: int = 10_000) -> Dataset:
    """Read and check a dataset folder (see the module docstring); InvalidDataset says what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidDataset(f"dataset folder {str(root)!r} does not exist or is not a folder")
    if (root / METADATA_FILE).is_file():
        pairs = _from_metadata(root)
    else:
        pairs = _from_caption_files(root)
    if not pairs:
        raise InvalidDataset(
            f"no images found: put images ({', '.join(IMAGE_SUFFIXES)}) with a same-name {CAPTION_SUFFIX} caption "
            f"beside each, or a {METADATA_FILE} with 'file_name' and 'text' on each line"
        )
    if len(pairs) > max_images:
        raise InvalidDataset(f"{len(pairs)} images is more than the limit of {max_images}")
    digest = hashlib.sha256()
    examples = []
    for name, path, caption in sorted(pairs):
        data = _check_image(name, path)
        digest.update(f"{name}\t{hashlib.sha256(data).hexdigest()}\t"
                      f"{hashlib.sha256(caption.encode()).hexdigest()}\n".encode())  # fmt: skip
        examples.append(Example(name, path, caption))
    return Dataset(root, tuple(examples), digest.hexdigest())


def _walk(root: Path):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for file in sorted(files):
            if not file.startswith("."):
                yield Path(folder) / file


def _from_caption_files(root: Path) -> list[tuple[str, Path, str]]:
    pairs, missing = [], []
    for path in _walk(root):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        name = path.relative_to(root).as_posix()
        caption_file = path.with_suffix(CAPTION_SUFFIX)
        if not caption_file.is_file():
            missing.append(name)
            continue
        pairs.append((name, path, _read_caption(caption_file, caption_file.relative_to(root).as_posix())))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InvalidDataset(f"{len(missing)} images have no caption: {shown}; "
                             f"add a same-name {CAPTION_SUFFIX} file beside each (001.png -> 001.txt)")  # fmt: skip
    return pairs


def _from_metadata(root: Path) -> list[tuple[str, Path, str]]:
    pairs, seen = [], set()
    with open(root / METADATA_FILE, "rb") as f:
        lines = f.read(64 * 1024 * 1024 + 1)
    for number, raw in enumerate(lines.splitlines(), 1):
        where = f"{METADATA_FILE} line {number}"
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidDataset(f"{where} is not a JSON object: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise InvalidDataset(f"{where} needs a string 'file_name' (the image, relative to the folder)")
        text = entry.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InvalidDataset(f"{where} ({entry['file_name']!r}) needs a non-empty string 'text' (the caption)")
        name = _safe_name(entry["file_name"], where)
        path = root / name
        if os.path.commonpath([os.path.realpath(root), os.path.realpath(path)]) != os.path.realpath(root):
            raise InvalidDataset(f"{where}: {name!r} leads outside the dataset folder")
        if not path.is_file():
            raise InvalidDataset(f"{where}: image {name!r} does not exist")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidDataset(f"{where}: {name!r} is not an image; allowed: {', '.join(IMAGE_SUFFIXES)}")
        if name in seen:
            raise InvalidDataset(f"{where}: {name!r} is listed twice")
        seen.add(name)
        pairs.append((name, path, text.strip()))
    return pairs


def _read_caption(path: Path, name: str) -> str:
    raw = path.read_bytes()
    if len(raw) > MAX_CAPTION_BYTES:
        raise InvalidDataset(f"caption {name!r} is larger than {MAX_CAPTION_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise InvalidDataset(f"caption {name!r} is not UTF-8 text") from None
    if not text:
        raise InvalidDataset(f"caption {name!r} is empty; describe the image in it")
    return text


def _check_image(name: str, path: Path) -> bytes:
    """The file's bytes, after Pillow decoded it fully (a truncated or fake image is refused here)."""
    from PIL import Image

    data = path.read_bytes()
    try:
        import io

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidDataset(f"image {name!r} is {width}x{height}: more than {MAX_IMAGE_PIXELS} pixels")
            image.load()
    except InvalidDataset:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidDataset(f"image {name!r} cannot be read: {reason[:200]}") from None
    return data


def _safe_name(name: str, where: str) -> str:
    """A relative '/'-separated path that stays inside the folder; InvalidDataset otherwise."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if not name or posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]) \
            or "\x00" in name:  # fmt: skip
        raise InvalidDataset(f"{where}: path {name!r} is not allowed: it must be relative and stay inside the dataset "
                             "(no '..', no leading '/', no drive letter)")  # fmt: skip
    return posix.as_posix()


def extract_zip(archive: Path, target: Path, max_members: int, max_bytes: int) -> None:
    """Extract a dataset zip into `target` (an empty folder) after checking every member; InvalidDataset if not."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidDataset(f"dataset is not a valid zip file: {exc}") from None
    with zf:
        members = zf.infolist()
        if len(members) > max_members:
            raise InvalidDataset(f"the zip has {len(members)} members, more than the limit of {max_members}")
        total = 0
        for info in members:
            name = _safe_name(info.filename, "zip member")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidDataset(f"zip member {name!r} is a link; only files and folders are allowed")
            if info.file_size > max_bytes:
                raise InvalidDataset(f"zip member {name!r} is {info.file_size} bytes, more than the limit of "
                                     f"{max_bytes} bytes")  # fmt: skip
            total += info.file_size
            if total > max_bytes:
                raise InvalidDataset(f"the zip's files add up to more than the limit of {max_bytes} bytes")
        for info in members:
            name = _safe_name(info.filename, "zip member")
            path = target / name
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(path, "xb") as dst:
                    while chunk := src.read(1024 * 1024):
                        written += len(chunk)
                        if written > info.file_size:  # the header lied about the size
                            raise InvalidDataset(f"zip member {name!r} is larger than its header says")
                        dst.write(chunk)
            except FileExistsError:
                raise InvalidDataset(f"zip member {name!r} appears twice") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, RuntimeError,
                    zlib.error) as exc:  # a corrupt, encrypted or unsupported member
                raise InvalidDataset(f"zip member {name!r} cannot be extracted: {exc}") from None
