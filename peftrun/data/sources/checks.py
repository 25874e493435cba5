"""Checking rows before anything heavy runs: every row of a local dataset (streamed, one row in memory),
the first rows of a Hub or saved one; a bad row is one UserError naming its file and row.

"Row N" in messages is the 1-based position of the sample in its file (for .jsonl the line number is
added when blank lines make it differ).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftrun.data.sources import hub
from peftrun.data.sources.fields import RowProblem, column_map, extract_fields, image_path
from peftrun.data.sources.paths import Located, locate
from peftrun.data.sources.readers import iter_file
from peftrun.errors import UserError

if TYPE_CHECKING:
    from peftrun.recipe.schema import DataConfig

# The check of a Hub or saved dataset reads this many rows, not the whole dataset.
_HUB_CHECK_ROWS = 200
# data.streaming: the rows of each dataset checked (and tokenized) before the first step.
STREAM_CHECK_ROWS = 1000


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


def _check_format_fits(path: str, key: str, file: Path, fmt: str) -> None:
    """The file's kind against data.format (`file` has passed local_file: it exists, its suffix is supported)."""
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
        name = located.name_of(file)
        limit = None if max_rows is None else max_rows - taken
        if limit == 0:
            break
        for item in checked_rows(name, islice(iter_file(name, file), limit), rules):
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
            rows = hub.load_hub(
                path, split, key, subset=subset, data_files=data_files, streaming=not hub.hub_offline()
            )
        else:
            rows = hub.load_saved(located.files[0], split, key)
        limit = min(max_rows or _HUB_CHECK_ROWS, _HUB_CHECK_ROWS)
        _check_rows(path, ((None, row) for row in islice(iter(rows), limit)), rules)
        return
    for _ in local_rows(located, key, rules, max_rows):
        pass


def check_source(cfg: DataConfig) -> None:
    """Pre-flight for `peftrun validate`: every dataset of the recipe exists, parses and holds the columns
    its format needs; only the first `max_samples` rows of each are checked since only those are used."""
    # A stream is checked on its first rows: it may be too big to read twice.
    max_rows = (
        min(cfg.max_samples or STREAM_CHECK_ROWS, STREAM_CHECK_ROWS) if cfg.streaming else cfg.max_samples
    )
    for source in cfg.sources():
        rules = RowRules.of(source.format, source.columns, cfg.tools, source.key_of("columns"))
        where: dict[str, Any] = {"subset": source.subset, "data_files": source.data_files}
        check_dataset(source.path, source.key_of("path"), rules, max_rows, split=source.split, **where)
        if source.val_path is not None:
            check_dataset(source.val_path, source.key_of("val_path"), rules)
        if source.val_split is not None:
            check_dataset(source.path, source.key_of("val_split"), rules, split=source.val_split, **where)
