"""One dataset of the recipe (a `Source`) -> its rows as a memory-mapped `datasets.Dataset`, plus a
content identity for the tokenized-data cache key.

    for source in cfg.sources():
        rows = read_source(source, cfg, cache_dir=cache_root / "rows")
        rows.train, rows.eval, rows.identity

How each kind of path is read (`peftrun.data.sources.locate` decides the kind):
- .json/.jsonl/.csv/.txt files, folders of them and globs, image folders: peftrun's streaming readers
  check each row (errors name the file and the row) and the rows are written to an Arrow file a batch
  at a time, so memory stays bounded; the file is memory-mapped. Chat rows are stored as JSON text in the
  ROW_JSON column; rows of the other formats as their checked string fields under the file's column
  names. (datasets' json/csv builders parse faster, but type columns their own way, cannot keep chat
  rows whole and would still need the checking pass: on 200k alpaca rows, 60 MB of JSON Lines, this
  takes 1.8 s, checking included; the check alone 1.15 s, plus 0.5-1.5 s for the json builder;
  `Dataset.from_generator` over the same checked rows 3.7 s.)
- .parquet files: a streaming check pass (a batch at a time), then datasets' parquet builder.
- a folder written by `save_to_disk`: memory-mapped as it is (a DatasetDict by its split).
- a Hub id: `datasets.load_dataset` with the dataset's subset, split and data_files.
Rows of Hub and saved datasets are checked row by row when they are tokenized.

No cache can serve stale rows: the Arrow written for local files is named by the files' sha256 (and
ROWS_VERSION), never by their modification times, and so is the folder of datasets' parquet cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from peftrun.data.sources import (
    ROW_JSON,
    Located,
    RowRules,
    load_hub,
    load_saved,
    local_rows,
    locate,
    sha256_of,
)
from peftrun.errors import UserError
from peftrun.staging import staged_file

if TYPE_CHECKING:
    import datasets

    from peftrun.recipe.data import DataConfig, Source

__all__ = ["ROWS_VERSION", "SourceRows", "read_source", "source_identity"]

# Bump whenever the rows written for the same files change, so Arrow written before is not reused.
ROWS_VERSION = "1"
_BATCH_ROWS = 10_000  # rows per Arrow record batch: a few MB of Python objects at a time


@dataclass
class SourceRows:
    """The rows of one dataset of the recipe."""

    source: Source
    train: datasets.Dataset  # its training rows (at most data.max_samples)
    eval: datasets.Dataset | None  # its val_path or val_split rows; None when it has neither
    identity: list[str]  # content ids of train (then eval), for the tokenized-data cache key


def read_source(
    source: Source, cfg: DataConfig, *, cache_dir: Path, identity: Sequence[str] | None = None
) -> SourceRows:
    """The rows of `source`, checked as they are read where they are local; `cfg` gives data.tools and
    data.max_samples. `cache_dir` holds the Arrow written for local files. `identity`, when the caller
    has it from `source_identity`, spares hashing the local files a second time. Bad data is a UserError."""
    rules = RowRules.of(source.format, source.columns, cfg.tools, source.key_of("columns"))
    known = list(identity) if identity is not None else [None, None]
    train, train_id = _read(
        source, source.path, source.key_of("path"), source.split, rules, cfg.max_samples, cache_dir, known[0]
    )
    if source.val_path is not None:
        if locate(source.val_path, source.key_of("val_path"), source.format).kind == "hub":
            raise UserError(
                f"{source.key_of('val_path')}: '{source.val_path}' is a Hub dataset; evaluate on one of its "
                "splits with val_split"
            )
        held_out = _read(
            source, source.val_path, source.key_of("val_path"), source.split, rules, None, cache_dir, known[1]
        )
    elif source.val_split is not None:
        held_out = _read(
            source,
            source.path,
            source.key_of("val_split"),
            source.val_split,
            rules,
            None,
            cache_dir,
            known[1],
        )
    else:
        return SourceRows(source, train, None, [train_id])
    return SourceRows(source, train, held_out[0], [train_id, held_out[1]])


def _read(
    source: Source,
    path: str,
    key: str,
    split: str,
    rules: RowRules,
    max_rows: int | None,
    cache_dir: Path,
    known_identity: str | None,
) -> tuple[datasets.Dataset, str]:
    """(rows, identity) of one path of `source`; a local path's `known_identity` is used as it is."""
    located = locate(path, key, rules.format)
    if located.kind in ("hub", "saved"):
        rows = _opened(source, located, key, split)
        return _narrow(rows, rules, max_rows), _opened_identity(source, located, split, rows)
    identity = known_identity or _local_identity(located)
    if located.kind == "files" and located.files[0].suffix.lower() == ".parquet":
        for _ in local_rows(located, key, rules, max_rows):  # the check pass: one batch in memory
            pass
        return _narrow(_load_parquet(located, identity, cache_dir), rules, max_rows), identity
    return _written_rows(located, key, rules, max_rows, identity, cache_dir), identity


def source_identity(source: Source) -> list[str]:
    """`read_source(source).identity` without reading the rows: local files are hashed, Hub and saved
    datasets opened (memory-mapped) for their fingerprints. Cheap enough for every process to compute
    the cache key while only the main one reads and tokenizes."""
    if source.val_path is not None:
        extra = [(source.val_path, source.key_of("val_path"), source.split)]
    elif source.val_split is not None:
        extra = [(source.path, source.key_of("val_split"), source.val_split)]
    else:
        extra = []
    identities = []
    for path, key, split in [(source.path, source.key_of("path"), source.split), *extra]:
        located = locate(path, key, source.format)
        if located.kind in ("hub", "saved"):
            rows = _opened(source, located, key, split)
            identities.append(_opened_identity(source, located, split, rows))
        else:
            identities.append(_local_identity(located))
    return identities


def _opened(source: Source, located: Located, key: str, split: str) -> datasets.Dataset:
    """A Hub or saved dataset, opened by `datasets` (memory-mapped from its cache)."""
    if located.kind == "hub":
        return load_hub(located.path, split, key, subset=source.subset, data_files=source.data_files)
    return load_saved(located.files[0], split, key)


def _opened_identity(source: Source, located: Located, split: str, rows: datasets.Dataset) -> str:
    # datasets derives the fingerprint from the builder config, data files and revision.
    if located.kind == "hub":
        where = json.dumps([located.path, source.subset, split, source.data_files])
        return f"hub:{where}:{rows._fingerprint}"
    return f"saved:{split}:{rows._fingerprint}"


def _narrow(rows: datasets.Dataset, rules: RowRules, max_rows: int | None) -> datasets.Dataset:
    """The first `max_rows` rows, with only the columns the format reads (those the dataset has)."""
    if max_rows is not None and max_rows < len(rows):
        rows = rows.select(range(max_rows))
    return rows.select_columns([c for c in rules.file_columns if c in rows.column_names])


def _local_identity(located: Located) -> str:
    """sha256 of each data file, in reading order; an image folder by its listing (the rows hold paths)."""
    if located.kind == "images":
        folder = located.files[0]
        listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return "images:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "sha256:" + ",".join(sha256_of(file) for file in located.files)


def _load_parquet(located: Located, identity: str, cache_dir: Path) -> datasets.Dataset:
    import datasets

    # datasets keys its own cache of local files by path and modification time; a folder per content
    # identity keeps a rewritten file from being served from it.
    folder = cache_dir / f"parquet-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"
    files = [str(file) for file in located.files]
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(folder))


def _written_rows(
    located: Located, key: str, rules: RowRules, max_rows: int | None, identity: str, cache_dir: Path
) -> datasets.Dataset:
    """Rows of local text files or an image folder, checked as they stream into an Arrow file in
    `cache_dir` (its name: the content identity, the rules and ROWS_VERSION), then memory-mapped."""
    import datasets

    names = [ROW_JSON] if rules.format == "chat" else rules.file_columns
    inputs = [ROWS_VERSION, identity, rules.format, rules.columns, max_rows]
    entry = cache_dir / f"rows-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:32]}.arrow"
    if not entry.is_file():
        with staged_file(entry) as tmp:  # complete or absent, whatever interrupts the write
            _write_arrow(tmp, names, _stored_rows(located, key, rules, max_rows))
    return datasets.Dataset.from_file(str(entry))


def _write_arrow(path: Path, names: list[str], rows: Iterator[dict[str, str]]) -> None:
    """An Arrow stream of string columns `names`, written a batch of rows at a time."""
    import pyarrow as pa

    schema = pa.schema([(name, pa.string()) for name in names])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while batch := list(islice(rows, _BATCH_ROWS)):
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))


def _stored_rows(
    located: Located, key: str, rules: RowRules, max_rows: int | None
) -> Iterator[dict[str, str]]:
    """The rows as stored: chat rows whole as JSON text; other rows as their checked fields, all strings."""
    for record, fields in local_rows(located, key, rules, max_rows):
        if rules.format == "chat":
            kept = {name: record[name] for name in rules.file_columns if name in record}
            yield {ROW_JSON: json.dumps(kept, ensure_ascii=False)}
        else:
            yield {rules.columns[name]: value for name, value in fields.items()}
