"""A row's values under peftrun's column names, checked: what every format needs of a row."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peftrun.data.sources.readers import type_name
from peftrun.errors import UserError, did_you_mean

# peftrun's column names per format; all are required but `input` (and `label` where nothing is trained).
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "conversations", "prompt", "completion", "tools"),
    "text": ("text",),
    "classification": ("text", "label"),
    "images": ("image", "label"),
}
_OPTIONAL = {"input"}
KNOWN_ROLES = ("system", "user", "assistant", "tool")
# Chat rows travel as JSON text in this one column: Arrow would give every message the union of all
# messages' keys (a null `tool_calls` on each, null arguments that no call had) and refuses mixed types.
ROW_JSON = "_row_json"


class RowProblem(ValueError):
    """What is wrong with one row; the caller adds the file and the row number."""


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
        raise RowProblem(f"'{file_column}' must be a string, got {type_name(value)}")
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


def image_path(source: str, value: str) -> Path:
    """Where an image named in a data file is: absolute, or relative to the data file's folder."""
    image = Path(value).expanduser()
    if image.is_absolute():
        return image
    base = Path(source).expanduser().resolve()
    return (base if base.is_dir() else base.parent) / image
