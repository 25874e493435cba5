"""One streaming reader per local file format: (line number or None, record) per sample, in order.

Formats:
- .jsonl: one JSON object per line; blank lines are skipped.
- .json: a JSON array of objects (or JSON Lines saved as .json).
- .csv: a header row, then one row per sample; every cell is a string.
- .parquet: one row per sample.
- .txt (format `text` only): one sample per paragraph, paragraphs being separated by blank lines, so a
  document keeps its line breaks; a file with no blank lines is a single sample.
- a directory (format `images` only): an image folder, one sub-folder per class, named after it.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any, TextIO

from peftrun.errors import UserError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# A JSON array is read this many characters at a time.
_JSON_CHUNK = 1 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _parse_error(path: str, where: str, message: str) -> UserError:
    return UserError(f"{path}: {where}{message}")


def _read_jsonl(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    with file.open(encoding="utf-8-sig") as handle:  # -sig: a byte order mark (Windows editors) is skipped
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _parse_error(
                    path, f"line {line_no}: ", f"invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise _parse_error(
                    path, f"line {line_no}: ", f"expected a JSON object, got {type_name(record)}"
                )
            yield line_no, record


def _read_json(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """A JSON array is streamed, one object in memory at a time; anything else (JSON Lines saved as
    .json, or a mistake) is parsed whole, as is an array found broken, so errors read as json.loads says."""
    with file.open(encoding="utf-8-sig") as handle:
        buffer, pos = _skip_space(handle, "", 0)
        if buffer[pos : pos + 1] == "[":
            try:
                for index, record in enumerate(_array_items(handle, buffer, pos + 1), start=1):
                    if not isinstance(record, dict):
                        raise _parse_error(
                            path, f"row {index}: ", f"expected a JSON object, got {type_name(record)}"
                        )
                    yield None, record
                return
            except _BrokenArray:
                pass
    yield from _read_json_whole(path, file)


class _BrokenArray(Exception):
    """The streamed array is not valid JSON; the whole-file parse says where."""


def _skip_space(handle: TextIO, buffer: str, pos: int) -> tuple[str, int]:
    """(buffer, position of its next non-space character), reading on as needed; position == len at EOF."""
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\n\r":
            pos += 1
        if pos < len(buffer):
            return buffer, pos
        more = handle.read(_JSON_CHUNK)
        if not more:
            return buffer, pos
        buffer, pos = more, 0


def _array_items(handle: TextIO, buffer: str, pos: int) -> Iterator[Any]:
    """The items of a JSON array whose '[' ends at `pos`; memory: a chunk and one item."""
    decoder = json.JSONDecoder()
    buffer, pos = _skip_space(handle, buffer, pos)
    if buffer[pos : pos + 1] == "]":
        buffer, pos = _skip_space(handle, buffer, pos + 1)
        if pos < len(buffer):
            raise _BrokenArray
        return
    while True:
        while True:
            try:
                item, pos = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError:  # cut at the chunk's end, or broken: read on to tell
                more = handle.read(_JSON_CHUNK)
                if not more:
                    raise _BrokenArray from None
                buffer, pos = buffer[pos:] + more, 0
        yield item
        buffer, pos = _skip_space(handle, buffer, pos)
        if buffer[pos : pos + 1] == ",":
            buffer, pos = _skip_space(handle, buffer, pos + 1)
        elif buffer[pos : pos + 1] == "]":
            buffer, pos = _skip_space(handle, buffer, pos + 1)
            if pos < len(buffer):
                raise _BrokenArray
            return
        else:
            raise _BrokenArray


def _read_json_whole(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    text = file.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and not text.lstrip().startswith("["):
            yield from _read_jsonl(path, file)  # several top-level objects: JSON Lines saved as .json
            return
        raise _parse_error(
            path, "", f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(records, list):
        keys = f" with keys {', '.join(map(str, records))}" if isinstance(records, dict) else ""
        raise _parse_error(path, "", f"expected a JSON array of objects, got {type_name(records)}{keys}")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise _parse_error(path, f"row {index}: ", f"expected a JSON object, got {type_name(record)}")
        yield None, record


def _read_csv(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    # Long texts exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        index = 0
        for cells in reader:
            if not cells:
                continue
            index += 1
            if header is not None and len(cells) != len(header):
                raise _parse_error(
                    path, f"row {index}: ", f"has {len(cells)} fields, the header has {len(header)}"
                )
            yield None, dict(zip(header or (), cells, strict=True))


def _read_parquet(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as exc:
        raise _parse_error(path, "", f"not a valid Parquet file ({exc})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield None, record


def _read_txt(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    lines: list[str] = []
    with file.open(encoding="utf-8-sig") as handle:
        for line in chain(handle, [""]):  # the trailing "" flushes the last paragraph
            if line.strip():
                lines.append(line)
            elif lines:
                yield None, {"text": "".join(lines).rstrip("\n")}
                lines = []


def _read_image_folder(path: str, folder: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """One row per image file, labelled with the name of the sub-folder it is in; sorted, so stable."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{path}: an image folder needs one sub-folder per class; found none")
    for class_dir in classes:
        for image in sorted(class_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file():
                yield None, {"image": str(image), "label": class_dir.name}


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def iter_file(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(line number or None, record) for each sample of a local file, in order; bad bytes are a UserError.

    Only JSON Lines has line numbers worth reporting beside the row number.
    """
    try:
        if file.is_dir():
            yield from _read_image_folder(path, file)
        else:
            yield from _READERS[file.suffix.lower()](path, file)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({_first_bad_line(file, exc)})") from None


def _first_bad_line(file: Path, exc: UnicodeDecodeError) -> str:
    """Where the first undecodable byte is, as a line and column (the decoder only knows its buffer)."""
    with file.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return f"byte 0x{line[bad.start]:02x} at line {line_no}, column {bad.start + 1}"
    return f"byte 0x{exc.object[exc.start]:02x}"


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)
