"""Tokenized datasets -> the training and evaluation splits, mixed as data.datasets asks.

Every split is an index selection of the tokenized Arrow files (nothing is copied until the cache entry
is written, a batch at a time). Per dataset: its dropped samples are left out, then its held-out
fraction (data.val_fraction) or its own eval rows (val_path / val_split) become evaluation samples;
evaluation sets are concatenated, never mixed. The training sets are mixed by `plan_mixture` when the
recipe lists several datasets or asks one for a weight or a sample count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from peftrun.data.arrow import SAMPLE_COLUMNS, TokenizedSource, column
from peftrun.data.mixture import Mixture, MixturePart, plan_mixture
from peftrun.data.report import DataReport, TokenizedData
from peftrun.data.rows import holdout_rows
from peftrun.data.tokenize import TokenizeStats
from peftrun.errors import UserError

if TYPE_CHECKING:
    import datasets

    from peftrun.recipe.data import DataConfig, Source

__all__ = ["TokenizedDataset", "assemble", "is_mixture"]


@dataclass
class TokenizedDataset:
    """One dataset of the recipe, tokenized: its training rows and its own eval rows, if any."""

    source: Source
    train: TokenizedSource
    eval: TokenizedSource | None = None


def _splits(
    part: TokenizedDataset, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training samples, evaluation samples) of one dataset, as index selections."""
    rows = part.train.dataset
    kept = column(rows, "dropped") == 0
    if val_fraction > 0:
        chosen = np.fromiter(holdout_rows(len(rows), val_fraction, seed), dtype=np.int64)
        held = np.isin(column(rows, "row"), chosen)
        return rows.select((kept & ~held).nonzero()[0]), rows.select((kept & held).nonzero()[0])
    if part.eval is not None:
        return rows.select(kept.nonzero()[0]), part.eval.dataset.select(part.eval.kept_indices())
    return rows.select(kept.nonzero()[0]), None


def is_mixture(cfg: DataConfig) -> bool:
    """Several datasets, or one asked for a weight or a sample count: the training set is planned."""
    sources = cfg.sources()
    return len(sources) > 1 or any(s.weight is not None or s.samples is not None for s in sources)


def _mix(parts: Sequence[TokenizedDataset], trains: list[datasets.Dataset], seed: int) -> Mixture:
    mixture_parts = [
        MixturePart(
            name=part.source.path,
            samples=len(train),
            weight=part.source.weight,
            take=part.source.samples,
            rows=part.train.stats.rows,
            dropped=part.train.stats.dropped_overlong + part.train.stats.dropped_empty,
            lengths=column(train, "length"),
        )
        for part, train in zip(parts, trains, strict=True)
    ]
    return plan_mixture(mixture_parts, seed)


def assemble(cfg: DataConfig, parts: Sequence[TokenizedDataset], seed: int) -> TokenizedData:
    """The splits and the report; an empty split is a UserError (training or evaluating on nothing)."""
    import datasets

    # Dataset i holds out with seed + i: the first (the only one of the short form) keeps the seed.
    splits = [_splits(part, cfg.val_fraction, seed + index) for index, part in enumerate(parts)]
    trains = [train for train, _ in splits]
    evals = [held_out for _, held_out in splits if held_out is not None]
    mixture = _mix(parts, trains, seed) if is_mixture(cfg) else None
    train = (
        datasets.concatenate_datasets(trains).select(mixture.indices) if mixture is not None else trains[0]
    )
    held_out = datasets.concatenate_datasets(evals) if evals else None
    stats = TokenizeStats()
    for part in parts:
        for tokenized in (part.train, part.eval):
            if tokenized is not None:
                stats += tokenized.stats
    report = DataReport(
        rows=stats.rows,
        kept=stats.kept,
        truncated=stats.truncated,
        template_warnings=stats.template_warnings,
        dropped_overlong=stats.dropped_overlong,
        dropped_empty=stats.dropped_empty,
        train_samples=len(train),
        eval_samples=len(held_out) if held_out is not None else 0,
        supervised_tokens=int(column(train, "supervised").sum(dtype=np.int64)),
        total_tokens=int(column(train, "length").sum(dtype=np.int64)),
        cache_hit=False,
        datasets=[asdict(part) for part in mixture.report] if mixture is not None else None,
    )
    _check_not_empty(cfg, report, train, held_out)
    return TokenizedData(
        train=train.select_columns(SAMPLE_COLUMNS),
        eval=held_out.select_columns(SAMPLE_COLUMNS) if held_out is not None else None,
        report=report,
    )


def _check_not_empty(
    cfg: DataConfig, report: DataReport, train: datasets.Dataset, held_out: datasets.Dataset | None
) -> None:
    counts = "; ".join(report.lines()[:2])
    names = ", ".join(source.path for source in cfg.sources())
    if not len(train):
        raise UserError(f"{names}: no training samples left ({counts})")
    if held_out is not None and not len(held_out):
        eval_names = ", ".join(s.val_path or s.val_split or s.path for s in cfg.sources())
        raise UserError(f"{eval_names}: no evaluation samples left ({counts})")
