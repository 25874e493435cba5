"""One source's rows -> tokenized samples in Arrow files, with per-row columns the report is counted from.

    part = tokenize_source(encoder, rows, work_dir / "train", num_proc, progress)
    part.stats  # rows, kept, truncated, dropped, template warnings: from Arrow columns
    train = part.dataset.select(part.kept_indices())

`datasets.Dataset.map` writes each batch of samples to disk as it goes (in `num_proc` worker processes
for big sets), so no process holds the tokens of the whole set in Python lists; training memory-maps the
files. Every row gets one output row, dropped ones with empty token lists and a drop reason, so the row
numbers (for the val_fraction hold-out) and the counts come from columns, not from Python objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftrun.data.progress import Progress
from peftrun.data.tokenize import DROP_REASONS, SampleEncoder, TokenizeStats, supervised_count

if TYPE_CHECKING:
    import datasets
    import numpy as np

__all__ = ["SAMPLE_COLUMNS", "TokenizedSource", "column", "default_num_proc", "tokenize_source"]

SAMPLE_COLUMNS = ["input_ids", "labels", "length"]  # what training reads; the rest is for the report
_BATCH_ROWS = 1000  # rows per tokenizer call and per Arrow write: amortises the call, keeps memory flat
# Rows per map call: progress is reported between calls, and each call forks its workers anew.
CHUNK_ROWS = 100_000
# Forking a worker and pickling the tokenizer into it costs about a second: below this many rows per
# worker, one process is faster.
_ROWS_PER_WORKER = 20_000
_MAX_WORKERS = 8


def default_num_proc(rows: int, cpus: int | None = None) -> int:
    """Worker processes for tokenizing `rows` rows: one per CPU up to 8, none extra for small sets."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS, rows // _ROWS_PER_WORKER))


def _features() -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "supervised": datasets.Value("int32"),  # tokens with a label
            "truncated": datasets.Value("bool"),
            "dropped": datasets.Value("int8"),  # index into DROP_REASONS; 0: kept
            "warned": datasets.Value("bool"),
            "row": datasets.Value("int64"),  # 1-based row number in the source
        }
    )


def encode_batch(
    batch: dict[str, list[Any]], indices: list[int], encoder: SampleEncoder, first_row: int
) -> dict[str, list[Any]]:
    """The map function: a batch of rows -> one output row each (module level, so workers can unpickle it)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    outcomes = encoder.outcomes(rows, first_row=first_row + indices[0])
    return {
        "input_ids": [o.input_ids for o in outcomes],
        "labels": [o.labels for o in outcomes],
        "length": [len(o.input_ids) for o in outcomes],
        "supervised": [supervised_count(o.labels) for o in outcomes],
        "truncated": [o.truncated for o in outcomes],
        "dropped": [DROP_REASONS.index(o.dropped) for o in outcomes],
        "warned": [o.warned for o in outcomes],
        "row": [o.row for o in outcomes],
    }


def column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One scalar column as a numpy array, read from Arrow (the dataset's index selection applied)."""
    return dataset.select_columns([name]).with_format("arrow")[:].column(name).to_numpy()


@dataclass
class TokenizedSource:
    """One source tokenized: a dataset with an output row per input row, and its counts."""

    dataset: datasets.Dataset  # SAMPLE_COLUMNS plus supervised, truncated, dropped, warned, row
    stats: TokenizeStats  # totals over the kept samples of the whole source

    def kept_indices(self) -> np.ndarray:
        return (column(self.dataset, "dropped") == 0).nonzero()[0]


def source_stats(dataset: datasets.Dataset) -> TokenizeStats:
    """What happened to a source's rows, counted from its Arrow columns."""
    import numpy as np

    dropped = column(dataset, "dropped")
    kept = dropped == 0
    return TokenizeStats(
        rows=len(dropped),
        kept=int(kept.sum()),
        truncated=int(column(dataset, "truncated")[kept].sum()),
        dropped_overlong=int((dropped == DROP_REASONS.index("overlong")).sum()),
        dropped_empty=int((dropped == DROP_REASONS.index("empty")).sum()),
        supervised_tokens=int(column(dataset, "supervised")[kept].sum(dtype=np.int64)),
        total_tokens=int(column(dataset, "length")[kept].sum(dtype=np.int64)),
        template_warnings=int(column(dataset, "warned").sum()),
    )


def tokenize_source(
    encoder: SampleEncoder,
    rows: datasets.Dataset,
    work_dir: Path,
    num_proc: int,
    progress: Progress,
    chunk_rows: int = CHUNK_ROWS,
) -> TokenizedSource:
    """Tokenize `rows` into Arrow files under `work_dir`, `chunk_rows` rows per map call.

    A bad row raises the encoder's UserError (file and row), from a worker process too: datasets
    re-raises the worker's exception in this process.
    """
    import datasets

    work_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for number, start in enumerate(range(0, len(rows), chunk_rows)):
        chunk = rows.select(range(start, min(start + chunk_rows, len(rows))))
        parts.append(
            chunk.map(
                encode_batch,
                batched=True,
                batch_size=_BATCH_ROWS,
                with_indices=True,
                fn_kwargs={"encoder": encoder, "first_row": start + 1},
                remove_columns=chunk.column_names,
                features=_features(),
                num_proc=num_proc if num_proc > 1 and len(chunk) > 1 else None,
                cache_file_name=str(work_dir / f"part-{number:05d}.arrow"),
                writer_batch_size=_BATCH_ROWS,
                load_from_cache_file=False,
                # The entry's cache key names the content already; hashing the encoder would cost seconds.
                new_fingerprint=f"{work_dir.name}-{number}",
            )
        )
        progress.update(start + len(chunk))
    dataset = datasets.concatenate_datasets(parts) if parts else _empty()
    return TokenizedSource(dataset, source_stats(dataset))


def _empty() -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({name: [] for name in _features()}, features=_features())
