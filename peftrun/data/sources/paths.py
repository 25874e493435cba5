"""What a data path names: a file, a folder of shards, a glob, a saved dataset, an image folder or a
Hub dataset id; and the sha256 of a local file."""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peftrun.data.sources.readers import SUPPORTED_SUFFIXES
from peftrun.errors import UserError

# Suffixes that mark a path as meant to be a file even if it does not exist (so the error says "not found"
# instead of trying the Hub); Hub ids may contain dots ('org/name-v1.2'), so any suffix would be too broad.
_FILE_LIKE_SUFFIXES = {
    *SUPPORTED_SUFFIXES,
    *(".ndjson", ".tsv", ".pq", ".arrow", ".feather", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"),
    *(".xlsx", ".xls", ".yaml", ".yml", ".md", ".html", ".xml", ".pkl", ".pt", ".npy"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(path: str) -> bool:
    """True when `path` is meant as a Hub dataset id rather than a local file."""
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(path)) and Path(path).suffix.lower() not in _FILE_LIKE_SUFFIXES


def local_file(path: str, key: str) -> Path:
    """The existing, supported file `path` (for messages, `key` is data.path or data.val_path);
    a directory is returned as is (an image folder, checked against the format by the caller)."""
    file = Path(path).expanduser().resolve()
    if not file.exists():
        raise UserError(f"{key}: file not found: {file}")
    if file.is_dir():
        return file
    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(
            f"{key}: unsupported file type '{file.suffix}' ({file}); use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return file


_GLOB_CHARS = frozenset("*?[")
# Files datasets' save_to_disk writes: a Dataset folder, a DatasetDict folder.
_SAVED_DATASET = ("state.json", "dataset_info.json")
_SAVED_DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class Located:
    """What a data path names. files: data files read in this order (one, a folder's shards or a glob's
    matches); saved: a folder written by save_to_disk; images: an image folder; hub: a Hub dataset id."""

    kind: Literal["files", "saved", "images", "hub"]
    path: str  # as the recipe gives it, for messages
    files: tuple[Path, ...] = ()  # files: the data files; saved/images: the folder

    def name_of(self, file: Path) -> str:
        """How messages name `file`: as the recipe gives it when it is that path; a shard by its own path."""
        return self.path if Path(self.path).expanduser().resolve() == file else str(file)


def locate(path: str, key: str, fmt: str | None = None) -> Located:
    """Resolve a data path; one UserError naming `key` when it names nothing usable.

    A folder is an image folder for format `images` (or when `fmt` is None and it holds no data files),
    a saved dataset when it holds save_to_disk's files, else a folder of shards (every supported file
    below it, sorted by path, all of one type).
    """
    if not path.strip():  # never the current directory by accident
        raise UserError(f"{key}: empty path")
    if is_hub_id(path):
        return Located("hub", path)
    if _GLOB_CHARS & set(path):
        pattern = str(Path(path).expanduser().absolute())
        matches = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"{key}: no file matches {pattern}")
        return Located("files", path, _one_type(key, path, [local_file(str(m), key) for m in matches]))
    file = local_file(path, key)
    if not file.is_dir():
        return Located("files", path, (file,))
    if any((file / name).is_file() for name in (*_SAVED_DATASET, _SAVED_DATASET_DICT)):
        return Located("saved", path, (file,))
    shards = sorted(
        p
        for p in file.rglob("*")
        if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    if fmt == "images" or (fmt is None and not shards):
        return Located("images", path, (file,))
    if not shards:
        raise UserError(
            f"{key}: {file} is a directory with no data files ({', '.join(SUPPORTED_SUFFIXES)}) and no "
            "saved dataset; point it at a data file (folders of images are for format images)"
        )
    return Located("files", path, _one_type(key, path, shards))


def _one_type(key: str, path: str, files: list[Path]) -> tuple[Path, ...]:
    suffixes = sorted({f.suffix.lower() for f in files})
    if len(suffixes) > 1:
        raise UserError(f"{key}: {path} mixes file types ({', '.join(suffixes)}); shards must be of one type")
    return tuple(files)


def digest_file(path: str, key: str = "data.path") -> str:
    """sha256 of a local data file's bytes: the cache key of what was read from it."""
    return sha256_of(local_file(path, key))


def sha256_of(file: Path) -> str:
    """sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
