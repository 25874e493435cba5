"""Reading data files (and Hub datasets) into rows, and checking them before anything heavy runs.

Local files are parsed here by one streaming reader per format, and the same reader serves both the
pre-flight `check_source` and `read_rows`. So what `peftrun validate` accepts is exactly what training
reads, row numbers in errors are exact, and no second cache (like `datasets`' own, keyed by file mtime)
can serve stale rows. The rows become an in-memory `datasets.Dataset`; Hub ids go through
`datasets.load_dataset`.

Formats:
- .jsonl: one JSON object per line; blank lines are skipped.
- .json: a JSON array of objects (or JSON Lines saved as .json).
- .csv: a header row, then one row per sample; every cell is a string.
- .parquet: one row per sample.
- .txt (format `text` only): one sample per paragraph, paragraphs being separated by blank lines, so a
  document keeps its line breaks; a file with no blank lines is a single sample.
- a directory (format `images` only): an image folder, one sub-folder per class, named after it.

"Row N" in messages is the 1-based position of the sample in the file (for .jsonl the line number
is added when blank lines make it differ).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftrun.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import datasets

    from peftrun.recipe.schema import DataConfig

__all__ = [
    "FIELDS",
    "KNOWN_ROLES",
    "ROW_JSON",
    "SUPPORTED_SUFFIXES",
    "RowProblem",
    "check_file",
    "check_source",
    "column_map",
    "digest_file",
    "extract_fields",
    "image_path",
    "is_hub_id",
    "read_rows",
]

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# Suffixes that mark a path as meant to be a file even if it does not exist (so the error says "not found"
# instead of trying the Hub); Hub ids may contain dots ('org/name-v1.2'), so any suffix would be too broad.
_FILE_LIKE_SUFFIXES = {
    *SUPPORTED_SUFFIXES,
    *(".ndjson", ".tsv", ".pq", ".arrow", ".feather", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"),
    *(".xlsx", ".xls", ".yaml", ".yml", ".md", ".html", ".xml", ".pkl", ".pt", ".npy"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_TIMEOUT_S = 5.0
# The Hub check of `validate` reads this many rows, not the whole dataset.
_HUB_CHECK_ROWS = 200

# peftrun's column names per format; all are required but `input` (and `label` where nothing is trained).
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "conversations", "prompt", "completion", "tools"),
    "text": ("text",),
    "classification": ("text", "label"),
    "images": ("image", "label"),
}
_OPTIONAL = {"input"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
# Chat rows travel as JSON text in this one column: Arrow would give every message the union of all
# messages' keys (a null `tool_calls` on each, null arguments that no call had) and refuses mixed types.
ROW_JSON = "_row_json"


class RowProblem(ValueError):
    """What is wrong with one row; the caller adds the file and the row number."""


# ---------------------------------------------------------------------------------------------- paths


def is_hub_id(path: str) -> bool:
    """True when `path` is meant as a Hub dataset id rather than a local file."""
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(path)) and Path(path).suffix.lower() not in _FILE_LIKE_SUFFIXES


def _local_file(path: str, key: str) -> Path:
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


def locate(path: str, key: str, fmt: str | None = None) -> Located:
    """Resolve a data path; one UserError naming `key` when it names nothing usable.

    A folder is an image folder for format `images` (or when `fmt` is None and it holds no data files),
    a saved dataset when it holds save_to_disk's files, else a folder of shards (every supported file
    below it, sorted by path, all of one type).
    """
    if is_hub_id(path):
        return Located("hub", path)
    if _GLOB_CHARS & set(path):
        pattern = str(Path(path).expanduser().absolute())
        matches = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"{key}: no file matches {pattern}")
        return Located("files", path, _one_type(key, path, [_local_file(str(m), key) for m in matches]))
    file = _local_file(path, key)
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


# -------------------------------------------------------------------------------------------- readers


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
                    path, f"line {line_no}: ", f"expected a JSON object, got {_type_name(record)}"
                )
            yield line_no, record


def _read_json(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    text = file.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            yield from _read_jsonl(path, file)
            return
        raise _parse_error(
            path, "", f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(records, list):
        keys = f" with keys {', '.join(map(str, records))}" if isinstance(records, dict) else ""
        raise _parse_error(path, "", f"expected a JSON array of objects, got {_type_name(records)}{keys}")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise _parse_error(path, f"row {index}: ", f"expected a JSON object, got {_type_name(record)}")
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


def _iter_file(path: str, file: Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
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


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ Hub


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _probe_hub(path: str, key: str) -> None:
    """Fail fast, with one line, when the Hub cannot serve dataset `path`.

    `datasets` retries an unreachable Hub for about half a minute before failing; one request with a
    short timeout answers the same question at once.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(path, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(
            f"{key}: Hub dataset '{path}' is gated; accept its terms and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{key}: '{path}' is neither a local file nor a Hub dataset (or it is private: hf auth login)"
        ) from None
    except Exception as exc:
        raise UserError(
            f"{key}: '{path}' is not a local file, and the Hugging Face Hub cannot be reached to load it as a "
            f"dataset ({exc}); download it first, or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def hub_load_args(
    path: str,
    split: str,
    subset: str | None = None,
    data_files: Sequence[str] | None = None,
    *,
    streaming: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `datasets.load_dataset` for a Hub dataset: `subset` is its config name."""
    return {
        "path": path,
        "name": subset,
        "split": split,
        "data_files": list(data_files) if data_files is not None else None,
        "streaming": streaming,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }


def load_hub(path: str, split: str, key: str, **options: Any) -> Any:
    """`datasets.load_dataset` for Hub id `path`; `options` are hub_load_args' (subset, data_files, ...)."""
    import datasets

    if not _hub_offline():
        _probe_hub(path, key)
    args = hub_load_args(path, split, **options)
    try:
        return datasets.load_dataset(**args)
    except ConnectionError as exc:
        raise UserError(
            f"{key}: cannot load Hub dataset '{path}' offline and it is not in the cache ({exc})"
        ) from None
    except ValueError as exc:  # unknown split, subset and similar
        subset = f" subset '{args['name']}'" if args["name"] else ""
        raise UserError(f"{key}: cannot load Hub dataset '{path}'{subset} split '{split}': {exc}") from None


# ----------------------------------------------------------------------------------------------- rows


def column_map(fmt: str, columns: Mapping[str, str], key: str = "data.columns") -> dict[str, str]:
    """peftrun's column name -> the file's, for `fmt`, after data.columns; unknown keys are a UserError
    naming `key`."""
    names = FIELDS[fmt]
    for name in columns:
        if name not in names:
            raise UserError(
                f"{key}: '{name}' is not a column of format {fmt}{did_you_mean(name, names)} "
                f"(peftrun's names: {', '.join(names)})"
            )
    return {name: columns.get(name, name) for name in names}


def _missing(name: str, file_column: str, row: Mapping[str, Any]) -> RowProblem:
    present = ", ".join(str(c) for c in row) or "none"
    if name == file_column:
        return RowProblem(f"missing '{name}' (columns: {present}); map it with data.columns")
    return RowProblem(f"missing '{file_column}' (data.columns maps {name} to it; columns: {present})")


def _string(row: Mapping[str, Any], name: str, file_column: str, optional: frozenset[str]) -> str:
    if file_column not in row:
        if name in optional:
            return ""
        raise _missing(name, file_column, row)
    value = row[file_column]
    if value is None and name in optional:
        return ""
    if name == "label" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # class ids written as numbers name their class
    if not isinstance(value, str):
        raise RowProblem(f"'{file_column}' must be a string, got {_type_name(value)}")
    return value


def extract_fields(
    row: Mapping[str, Any],
    fmt: str,
    columns: Mapping[str, str],
    labelled: bool = True,
    recipe_tools: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The row's values under peftrun's names, checked: strings for alpaca/text/classification/images
    (a label may be an integer), messages and tools for chat (see peftrun.data.chat.messages;
    `recipe_tools` are data.tools, for rows without their own).

    `columns` is `column_map(...)`. Raises RowProblem; an absent or null `input` reads as "", and so
    does an absent `label` when `labelled` is False (rows to predict).
    """
    if fmt == "chat":
        from peftrun.data.chat.messages import conversation_of

        if ROW_JSON in row:
            row = json.loads(row[ROW_JSON])
        conversation = conversation_of(row, columns, recipe_tools)
        return {"messages": conversation.messages, "tools": conversation.tools}
    optional = frozenset(_OPTIONAL if labelled else {*_OPTIONAL, "label"})
    fields = {name: _string(row, name, columns[name], optional) for name in FIELDS[fmt]}
    if fmt == "classification" and not fields["text"].strip():
        raise RowProblem(f"'{columns['text']}' is empty")
    if "label" in fields and labelled and not fields["label"].strip():
        raise RowProblem(f"'{columns['label']}' is empty")
    return fields


def _row_label(index: int, line_no: int | None) -> str:
    return f"row {index}" if line_no in (None, index) else f"row {index} (line {line_no})"


@dataclass(frozen=True)
class RowRules:
    """What each row of one dataset must hold: its format, its columns and data.tools (chat)."""

    format: str
    columns: dict[str, str]  # peftrun's column name -> the file's (column_map)
    tools: Sequence[dict[str, Any]] | None = None

    @classmethod
    def of(
        cls,
        fmt: str,
        columns: Mapping[str, str],
        tools: Sequence[dict[str, Any]] | None = None,
        key: str = "data.columns",
    ) -> RowRules:
        return cls(fmt, column_map(fmt, columns, key), tools)

    @property
    def file_columns(self) -> list[str]:
        """The file's columns the rows are read from, each once."""
        return list(dict.fromkeys(self.columns.values()))


def checked_rows(
    path: str, records: Iterator[tuple[int | None, Mapping[str, Any]]], rules: RowRules
) -> Iterator[tuple[Mapping[str, Any], dict[str, Any]]]:
    """(record, its fields under peftrun's names) for each record; a bad row is a UserError naming it."""
    for count, (line_no, record) in enumerate(records, start=1):
        try:
            fields = extract_fields(record, rules.format, rules.columns, recipe_tools=rules.tools)
            if rules.format == "images" and not image_path(path, fields["image"]).is_file():
                raise RowProblem(f"image file not found: {image_path(path, fields['image'])}")
        except RowProblem as exc:
            raise UserError(f"{path}: {_row_label(count, line_no)}: {exc}") from None
        yield record, fields


def _check_rows(path: str, records: Iterator[tuple[int | None, Mapping[str, Any]]], rules: RowRules) -> int:
    """Check every record; returns how many there were."""
    count = sum(1 for _ in checked_rows(path, records, rules))
    if count == 0:
        raise UserError(f"{path}: no rows")
    return count


def image_path(source: str, value: str) -> Path:
    """Where an image named in a data file is: absolute, or relative to the data file's folder."""
    image = Path(value).expanduser()
    if image.is_absolute():
        return image
    base = Path(source).expanduser().resolve()
    return (base if base.is_dir() else base.parent) / image


def _check_format_fits(path: str, key: str, file: Path, fmt: str) -> None:
    """The file's kind against data.format (`file` has passed _local_file: it exists, its suffix is supported)."""
    suffix = file.suffix.lower()
    if suffix == ".txt" and fmt != "text":
        raise UserError(f"{key}: {path} is raw text; a .txt file can only be used with data.format: text")
    if suffix == ".csv" and fmt == "chat":
        raise UserError(f"{key}: {path}: chat messages are nested lists, which CSV cannot hold; use .jsonl")
    if file.is_dir() and fmt != "images":
        raise UserError(
            f"{key}: {file} is a directory; point it at a data file (folders are for format images)"
        )


def local_rows(
    located: Located, key: str, rules: RowRules, max_rows: int | None = None
) -> Iterator[tuple[Mapping[str, Any], dict[str, Any]]]:
    """(record, its checked fields) for the first `max_rows` rows of a `files` or `images` location, file
    after file, one row in memory at a time; a bad row is a UserError naming its file and row."""
    taken = 0
    for file in located.files:
        _check_format_fits(located.path, key, file, rules.format)
        # A file the recipe names keeps that name in messages; shards are named by their own paths.
        name = located.path if Path(located.path).expanduser().resolve() == file else str(file)
        limit = None if max_rows is None else max_rows - taken
        if limit == 0:
            break
        for item in checked_rows(name, islice(_iter_file(name, file), limit), rules):
            taken += 1
            yield item
    if taken == 0:
        raise UserError(f"{located.path}: no rows")


def check_file(path: str, cfg: DataConfig, key: str = "data.path", max_rows: int | None = None) -> None:
    """Check a local data file (its first `max_rows` rows) against `cfg`; `key` names it in errors."""
    check_dataset(path, key, RowRules.of(cfg.format, cfg.columns, cfg.tools), max_rows)


def check_dataset(
    path: str,
    key: str,
    rules: RowRules,
    max_rows: int | None = None,
    *,
    split: str = "train",
    subset: str | None = None,
    data_files: Sequence[str] | None = None,
) -> None:
    """Check one dataset (its first `max_rows` rows) against `rules`; `key` names its path in errors.

    Local files are streamed, so memory stays flat. A Hub or saved dataset is checked on its first rows
    (training still checks every row).
    """
    located = locate(path, key, rules.format)
    if located.kind in ("hub", "saved"):
        if located.kind == "hub":
            rows = load_hub(
                path, split, key, subset=subset, data_files=data_files, streaming=not _hub_offline()
            )
        else:
            rows = load_saved(located.files[0], split, key)
        limit = min(max_rows or _HUB_CHECK_ROWS, _HUB_CHECK_ROWS)
        _check_rows(path, ((None, row) for row in islice(iter(rows), limit)), rules)
        return
    for _ in local_rows(located, key, rules, max_rows):
        pass


def check_source(cfg: DataConfig) -> None:
    """Pre-flight for `peftrun validate`: every dataset of the recipe exists, parses and holds the columns
    its format needs; only the first `max_samples` rows of each are checked since only those are used."""
    for source in cfg.sources():
        rules = RowRules.of(source.format, source.columns, cfg.tools, source.key_of("columns"))
        hub: dict[str, Any] = {"subset": source.subset, "data_files": source.data_files}
        check_dataset(source.path, source.key_of("path"), rules, cfg.max_samples, split=source.split, **hub)
        if source.val_path is not None:
            check_dataset(source.val_path, source.key_of("val_path"), rules)
        if source.val_split is not None:
            check_dataset(source.path, source.key_of("val_split"), rules, split=source.val_split, **hub)


def load_saved(folder: Path, split: str, key: str) -> Any:
    """A folder written by `save_to_disk`: the Dataset, or split `split` of a DatasetDict (memory-mapped)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise UserError(f"{key}: {folder} is not a readable saved dataset ({exc})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(
                f"{key}: {folder} has no split '{split}'{did_you_mean(split, saved)} (splits: {', '.join(saved)})"
            )
        return saved[split]
    return saved


def digest_file(path: str, key: str = "data.path") -> str:
    """sha256 of a local data file's bytes: the cache key of what was read from it."""
    digest = hashlib.sha256()
    with _local_file(path, key).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _dataset_from_records(
    path: str, records: list[dict[str, Any]], columns: Sequence[str] | None, as_json: bool = False
) -> Any:
    import datasets

    names = list(columns) if columns is not None else list(dict.fromkeys(k for r in records for k in r))
    if as_json:
        rows = [json.dumps({n: r[n] for n in names if n in r}, ensure_ascii=False) for r in records]
        return datasets.Dataset.from_dict({ROW_JSON: rows})
    table = {name: [record.get(name) for record in records] for name in names}
    try:
        return datasets.Dataset.from_dict(table)
    except Exception as exc:  # pyarrow cannot give one type to a column holding several
        raise UserError(
            f"{path}: cannot build a table from the file ({exc}); check the types of its columns"
        ) from None


def read_rows(
    path: str,
    split: str = "train",
    max_samples: int | None = None,
    *,
    columns: Sequence[str] | None = None,
    key: str = "data.path",
    cache_dir: Path | None = None,
    as_json: bool = False,
    subset: str | None = None,
    data_files: Sequence[str] | None = None,
) -> datasets.Dataset:
    """The rows of a local file or Hub dataset, at most `max_samples` of them, as a `datasets.Dataset`.

    `path` is anything `locate` resolves (shards are read in order). `split` applies to Hub datasets and
    saved DatasetDicts. `columns` keeps just those file columns (missing ones read as
    null), which also spares pyarrow from typing columns nobody uses. `key` names the recipe key in
    errors; `cache_dir` is where `datasets` caches Hub downloads (default: its own cache). `as_json` keeps
    each local row whole, as JSON text in the ROW_JSON column (chat rows, whose messages vary in shape).
    `subset` and `data_files` select a Hub dataset's configuration and files.
    """
    if is_hub_id(path):
        rows = load_hub(path, split, key, subset=subset, data_files=data_files, cache_dir=cache_dir)
        if max_samples is not None:
            rows = rows.select(range(min(max_samples, len(rows))))
        if columns is not None:
            rows = rows.select_columns([c for c in columns if c in rows.column_names])
        return rows
    located = locate(path, key)
    if located.kind == "saved":
        rows = load_saved(located.files[0], split, key)
        if max_samples is not None:
            rows = rows.select(range(min(max_samples, len(rows))))
        return (
            rows if columns is None else rows.select_columns([c for c in columns if c in rows.column_names])
        )
    records = (record for file in located.files for _, record in _iter_file(str(file), file))
    return _dataset_from_records(path, list(islice(records, max_samples)), columns, as_json)
