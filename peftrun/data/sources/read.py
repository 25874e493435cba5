"""`read_rows`: the rows of one data path as a `datasets.Dataset` (in memory for local files), for the
tasks that read one small dataset (classification, masked LM, images) and `peftrun data`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftrun.data.sources import hub
from peftrun.data.sources.fields import ROW_JSON
from peftrun.data.sources.paths import locate
from peftrun.data.sources.readers import iter_file
from peftrun.errors import UserError

if TYPE_CHECKING:
    import datasets


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
    located = locate(path, key)
    if located.kind in ("hub", "saved"):
        if located.kind == "hub":
            rows = hub.load_hub(path, split, key, subset=subset, data_files=data_files, cache_dir=cache_dir)
        else:
            rows = hub.load_saved(located.files[0], split, key)
        if max_samples is not None:
            rows = rows.select(range(min(max_samples, len(rows))))
        return (
            rows if columns is None else rows.select_columns([c for c in columns if c in rows.column_names])
        )
    records = (record for file in located.files for _, record in iter_file(located.name_of(file), file))
    return _dataset_from_records(path, list(islice(records, max_samples)), columns, as_json)
