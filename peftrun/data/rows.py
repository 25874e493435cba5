"""Rows for the encoder and image tasks: read, checked, split into train/eval, labels mapped to ids.

The causal-LM path (`peftrun.data.prepare_data`) tokenizes with loss masks and caches; these tasks
need neither (one label per sample, small data, a tokenizer call or an image path per row), so their
rows are read and checked here with the same readers and the same row-numbered errors.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from peftrun.data.sources import RowProblem, column_map, extract_fields, read_rows
from peftrun.errors import UserError

if TYPE_CHECKING:
    import datasets
    import torch.utils.data

    from peftrun.recipe.schema import DataConfig

T = TypeVar("T")


@dataclass
class Row:
    source: str  # the file it came from (data.path or data.val_path), for messages
    number: int  # 1-based row number in that file
    fields: dict[str, Any]  # peftrun's column names -> checked values


@dataclass
class SplitRows:
    train: list[Row]
    eval: list[Row] | None  # None when the recipe asks for no evaluation data
    rows: int  # rows read, train file and val_path together


@dataclass
class SampleReport:
    """What became of the rows; `classes` counts training samples per class (classifiers only)."""

    rows: int
    train_samples: int
    eval_samples: int
    truncated: int = 0
    dropped_overlong: int = 0
    classes: dict[str, int] | None = None

    def lines(self) -> list[str]:
        found = [
            f"data: {self.rows:,} rows -> {self.train_samples:,} train, {self.eval_samples:,} eval samples",
            f"data: {self.truncated:,} truncated to max_seq_len, {self.dropped_overlong:,} dropped as over-long",
        ]
        if self.classes is not None:
            counts = ", ".join(f"{name} {count:,}" for name, count in self.classes.items())
            found.append(f"data: {len(self.classes)} classes (train samples): {counts}")
        return found


@dataclass
class TaskData:
    """What every task's data preparation returns to the training loop."""

    train: datasets.Dataset | torch.utils.data.IterableDataset[Any]  # iterable: data.streaming
    eval: datasets.Dataset | None
    report: Any  # a dataclass with lines(); recorded in the manifest
    label_names: list[str] | None = field(default=None)


def _read(path: str, cfg: DataConfig, key: str, labelled: bool) -> list[Row]:
    columns = column_map(cfg.format, cfg.columns)
    max_rows = cfg.max_samples if key == "data.path" else None
    table = read_rows(
        path,
        cfg.split,
        max_rows,
        columns=list(dict.fromkeys(columns.values())),
        key=key,
        subset=cfg.subset,
        data_files=cfg.data_files,
    )
    rows = []
    for number, record in enumerate(table, start=1):
        try:
            rows.append(Row(path, number, extract_fields(record, cfg.format, columns, labelled=labelled)))
        except RowProblem as exc:
            raise UserError(f"{path}: row {number}: {exc}") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def holdout_rows(num_rows: int, fraction: float, seed: int) -> set[int]:
    """Row numbers (1-based) held out for evaluation: a seeded sample, so reruns hold out the same rows."""
    count = max(1, round(num_rows * fraction))
    if count >= num_rows:
        raise UserError(f"data.val_fraction={fraction} of {num_rows} rows leaves no rows to train on")
    return {index + 1 for index in random.Random(seed).sample(range(num_rows), count)}


def split_held_out(
    items: list[T], row_of: Callable[[T], int], num_rows: int, fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """(train, held out) of rows, or of samples made from them, by `holdout_rows`: every task's data
    path holds out the same rows of the same file."""
    chosen = holdout_rows(num_rows, fraction, seed)
    return [x for x in items if row_of(x) not in chosen], [x for x in items if row_of(x) in chosen]


def read_split(cfg: DataConfig, seed: int, labelled: bool = True) -> SplitRows:
    """The recipe's rows, checked, with the evaluation rows held out (val_fraction) or read (val_path)."""
    train = _read(cfg.path, cfg, "data.path", labelled)
    count = len(train)
    held_out: list[Row] | None = None
    if cfg.val_fraction > 0:
        train, held_out = split_held_out(train, lambda r: r.number, len(train), cfg.val_fraction, seed)
    elif cfg.val_path is not None:
        held_out = _read(cfg.val_path, cfg, "data.val_path", labelled)
        count += len(held_out)
    return SplitRows(train, held_out, count)


# ---- labels ----------------------------------------------------------------------------------------------


def label_names_of(values: Iterable[str]) -> list[str]:
    """Distinct labels in a stable order: numeric when every label is an integer ('2' before '10')."""
    distinct = set(values)
    if distinct and all(v.strip().lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def resolve_labels(split: SplitRows, cfg: DataConfig) -> list[str]:
    """data.labels when set, else the training rows' labels; fewer than two classes cannot be learned."""
    names = (
        list(cfg.labels) if cfg.labels is not None else label_names_of(r.fields["label"] for r in split.train)
    )
    if len(names) < 2:
        raise UserError(f"{cfg.path}: a classifier needs at least 2 classes; the labels are {names}")
    return names


def label_ids(rows: Sequence[Row], names: Sequence[str]) -> list[int]:
    """Each row's class id; a label outside `names` is an error naming the file and row."""
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row in rows:
        label = row.fields["label"]
        if label not in index:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise UserError(
                f"{row.source}: row {row.number}: label '{label}' is not one of the classes ({shown})"
            )
        ids.append(index[label])
    return ids


def class_counts(ids: Sequence[int], names: Sequence[str]) -> dict[str, int]:
    counts = Counter(ids)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}
