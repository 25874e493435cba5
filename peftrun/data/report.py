"""What data preparation tells the log and the run's manifest, and what it hands to training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftrun.data.mixture import PartReport, describe

if TYPE_CHECKING:
    import datasets

__all__ = ["DataReport", "TokenizedData"]


@dataclass
class DataReport:
    rows: int  # rows read: the training file's (after max_samples) plus val_path's
    kept: int  # samples kept, train + eval
    truncated: int  # kept, but cut to max_seq_len
    dropped_overlong: int  # over max_seq_len with overlong=drop, or nothing trainable left after truncation
    dropped_empty: int  # nothing to learn: empty output/text, or no assistant turn
    train_samples: int
    eval_samples: int
    supervised_tokens: int  # train split: tokens with a label (the loss is computed on them)
    total_tokens: int  # train split: all tokens
    cache_hit: bool
    template_warnings: int = 0  # chat rows with a template warning (`peftrun data` lists them)
    chat_masks: str | None = None  # chat: where the trained spans come from
    packed_rows: int | None = None  # data.packing: training sequences the samples were packed into
    packed_capacity: int | None = None  # their maximum length (max_seq_len)
    # data.datasets mixed: per dataset, rows, samples, drops, samples taken, share and tokens (PartReport)
    datasets: list[dict[str, Any]] | None = None

    def lines(self) -> list[str]:
        """Human-readable summary for the log."""
        share = 100 * self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        return (
            [
                f"data: {self.rows:,} rows -> {self.kept:,} samples ({self.train_samples:,} train, "
                f"{self.eval_samples:,} eval)",
                f"data: {self.truncated:,} truncated to max_seq_len, {self.dropped_overlong:,} dropped as over-long, "
                f"{self.dropped_empty:,} dropped with nothing to learn",
                f"data: {self.total_tokens:,} train tokens per epoch, {self.supervised_tokens:,} supervised ({share:.1f}%)",
                f"data: tokenized data {'loaded from the cache' if self.cache_hit else 'tokenized and cached'}",
            ]
            + (describe([PartReport(**part) for part in self.datasets]) if self.datasets else [])
            + ([f"data: chat masks from {self.chat_masks}"] if self.chat_masks else [])
            + (
                [
                    f"data: {self.template_warnings:,} rows with template warnings; `peftrun data RECIPE` shows them"
                ]
                if self.template_warnings
                else []
            )
            + (
                [
                    f"data: packed {self.train_samples:,} train samples into {self.packed_rows:,} sequences of up to "
                    f"{self.packed_capacity:,} tokens ({100 * self.total_tokens / (self.packed_rows * self.packed_capacity):.1f}% full)"
                ]
                if self.packed_rows and self.packed_capacity
                else []
            )
        )


@dataclass
class TokenizedData:
    train: datasets.Dataset  # columns input_ids, labels (lists of int32), length
    eval: datasets.Dataset | None
    report: DataReport
