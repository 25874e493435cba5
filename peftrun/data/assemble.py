"""Tokenized datasets -> the training and evaluation splits, mixed as data.datasets asks.

Every split is an index array into the tokenized Arrow files, which the cache entry keeps as they were
written: nothing is copied, and a million samples cost 8 MB of indices. Per dataset: its dropped samples are left out, then its held-out
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

__all__ = ["Assembled", "TokenizedDataset", "assemble", "is_mixture"]


@dataclass
class TokenizedDataset:
    """One dataset of the recipe, tokenized: its training rows and its own eval rows, if any."""

    source: Source
    train: TokenizedSource
    eval: TokenizedSource | None = None


def _splits(part: TokenizedDataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training rows, evaluation rows) of one dataset: indices into its train rows, and into its train
    rows (held out) or its own eval rows; None when it gives no evaluation rows."""
    rows = part.train.dataset
    kept = column(rows, "dropped") == 0
    if val_fraction > 0:
        chosen = np.fromiter(holdout_rows(len(rows), val_fraction, seed), dtype=np.int64)
        held = np.isin(column(rows, "row"), chosen)
        return (kept & ~held).nonzero()[0], (kept & held).nonzero()[0]
    return kept.nonzero()[0], part.eval.kept_indices() if part.eval is not None else None


def is_mixture(cfg: DataConfig) -> bool:
    """Several datasets, or one asked for a weight or a sample count: the training set is planned."""
    sources = cfg.sources()
    return len(sources) > 1 or any(s.weight is not None or s.samples is not None for s in sources)


def _mix(parts: Sequence[TokenizedDataset], lengths: list[np.ndarray], seed: int) -> Mixture:
    mixture_parts = [
        MixturePart(
            name=part.source.path,
            samples=len(part_lengths),
            weight=part.source.weight,
            take=part.source.samples,
            rows=part.train.stats.rows,
            dropped=part.train.stats.dropped_overlong + part.train.stats.dropped_empty,
            lengths=part_lengths,
        )
        for part, part_lengths in zip(parts, lengths, strict=True)
    ]
    return plan_mixture(mixture_parts, seed)


@dataclass
class Assembled:
    """The splits as global indices into `tokenized`, the datasets' tokenized rows one after another
    (each dataset's train rows, then its own eval rows), and the report. Nothing is copied: the cache
    entry keeps the tokenized files and these indices."""

    tokenized: datasets.Dataset
    train: np.ndarray
    eval: np.ndarray | None
    report: DataReport

    def data(self) -> TokenizedData:
        return TokenizedData(
            train=self.tokenized.select(self.train).select_columns(SAMPLE_COLUMNS),
            eval=self.tokenized.select(self.eval).select_columns(SAMPLE_COLUMNS)
            if self.eval is not None
            else None,
            report=self.report,
        )


def assemble(cfg: DataConfig, parts: Sequence[TokenizedDataset], seed: int) -> Assembled:
    """The splits and the report; an empty split is a UserError (training or evaluating on nothing)."""
    import datasets

    tables: list[datasets.Dataset] = []
    trains: list[np.ndarray] = []
    evals: list[np.ndarray] = []
    for index, part in enumerate(parts):
        # Dataset i holds out with seed + i: the first (the only one of the short form) keeps the seed.
        train_rows, eval_rows = _splits(part, cfg.val_fraction, seed + index)
        offset = sum(len(table) for table in tables)
        tables.append(part.train.dataset)
        trains.append(offset + train_rows)
        if eval_rows is not None:
            own = part.eval is not None and cfg.val_fraction == 0
            if own:
                assert part.eval is not None
                tables.append(part.eval.dataset)
            evals.append(offset + (len(part.train.dataset) if own else 0) + eval_rows)
    tokenized = datasets.concatenate_datasets(tables)
    lengths = column(tokenized, "length")
    mixture = _mix(parts, [lengths[rows] for rows in trains], seed) if is_mixture(cfg) else None
    train = np.concatenate(trains)[mixture.indices] if mixture is not None else trains[0]
    held_out = np.concatenate(evals) if evals else None
    report = _report(parts, tokenized, lengths, train, held_out, mixture)
    _check_not_empty(cfg, report, train, held_out)
    return Assembled(tokenized, train, held_out, report)


def _report(
    parts: Sequence[TokenizedDataset],
    tokenized: datasets.Dataset,
    lengths: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray | None,
    mixture: Mixture | None,
) -> DataReport:
    stats = TokenizeStats()
    for part in parts:
        for rows in (part.train, part.eval):
            if rows is not None:
                stats += rows.stats
    return DataReport(
        rows=stats.rows,
        kept=stats.kept,
        truncated=stats.truncated,
        template_warnings=stats.template_warnings,
        dropped_overlong=stats.dropped_overlong,
        dropped_empty=stats.dropped_empty,
        train_samples=len(train),
        eval_samples=len(held_out) if held_out is not None else 0,
        supervised_tokens=int(column(tokenized, "supervised")[train].sum(dtype=np.int64)),
        total_tokens=int(lengths[train].sum(dtype=np.int64)),
        cache_hit=False,
        datasets=[asdict(part) for part in mixture.report] if mixture is not None else None,
    )


def _check_not_empty(
    cfg: DataConfig, report: DataReport, train: np.ndarray, held_out: np.ndarray | None
) -> None:
    counts = "; ".join(report.lines()[:2])
    names = ", ".join(source.path for source in cfg.sources())
    if not len(train):
        raise UserError(f"{names}: no training samples left ({counts})")
    if held_out is not None and not len(held_out):
        eval_names = ", ".join(s.val_path or s.val_split or s.path for s in cfg.sources())
        raise UserError(f"{eval_names}: no evaluation samples left ({counts})")
