"""Text for encoder (BERT-like) models: sequence classification and masked-LM pre-training.

Unlike the causal-LM path, samples are tokenized with the tokenizer's own special tokens
(`[CLS] text [SEP]`), because that is the layout the encoder was pre-trained on and the one its
pooler and classifier read.

Masking for masked_lm uses transformers' `DataCollatorForLanguageModeling` rule (80% [MASK],
10% random token, 10% unchanged; special tokens never masked), with one generator per sample seeded
from the recipe's seed and the sample's tokens. A sample's masks therefore depend on nothing else:
a resumed run, a different micro-batch size or a 2-process run mask exactly the same positions,
and the evaluation loss is measured on the same masks every time.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from peftrun.data.rows import (
    Row,
    SampleReport,
    SplitRows,
    TaskData,
    class_counts,
    label_ids,
    read_split,
    resolve_labels,
)
from peftrun.data.tokenize import IGNORE_INDEX, attention_mask, pad
from peftrun.errors import UserError

if TYPE_CHECKING:
    import torch

    from peftrun.recipe.schema import DataConfig


def _encode(
    rows: Sequence[Row], tokenizer: Any, cfg: DataConfig, report: SampleReport
) -> tuple[list[list[int]], list[Row]]:
    """Token ids per row with special tokens, after data.overlong; returns (ids, rows kept)."""
    texts = [row.fields["text"] for row in rows]
    if not texts:
        return [], []
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    overlong = [i for i, whole in enumerate(ids) if len(whole) > cfg.max_seq_len]
    if overlong and cfg.overlong == "error":
        row, length = rows[overlong[0]], len(ids[overlong[0]])
        raise UserError(
            f"{row.source}: row {row.number}: sample is {length} tokens, longer than "
            f"data.max_seq_len={cfg.max_seq_len}; raise it, or set data.overlong to truncate or drop"
        )
    if overlong and cfg.overlong == "truncate":
        # The tokenizer truncates (it knows where its special tokens go); only the rows that need it.
        cut = tokenizer(
            [texts[i] for i in overlong], add_special_tokens=True, truncation=True, max_length=cfg.max_seq_len
        )["input_ids"]
        for i, truncated in zip(overlong, cut, strict=True):
            ids[i] = truncated
        report.truncated += len(overlong)
    dropped = set(overlong) if cfg.overlong == "drop" else set()
    report.dropped_overlong += len(dropped)
    kept = [i for i in range(len(rows)) if i not in dropped]
    return [list(ids[i]) for i in kept], [rows[i] for i in kept]


def _dataset(columns: dict[str, list[Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(columns)


def _encode_split(
    split: SplitRows,
    tokenizer: Any,
    cfg: DataConfig,
    columns: Callable[[list[Row]], dict[str, list[Any]]],
) -> tuple[Any, Any, SampleReport]:
    """Both parts of a split as datasets: input_ids, the row numbers, and what `columns` adds for the
    rows kept."""
    report = SampleReport(split.rows, 0, 0)

    def build(rows: list[Row]) -> Any:
        ids, kept = _encode(rows, tokenizer, cfg, report)
        return _dataset({"input_ids": ids, **columns(kept), "row": [r.number for r in kept]})

    train = build(split.train)
    held_out = build(split.eval) if split.eval is not None else None
    report.train_samples, report.eval_samples = len(train), len(held_out) if held_out is not None else 0
    if len(train) == 0:
        raise UserError(f"{cfg.path}: no training samples left ({'; '.join(report.lines()[:2])})")
    if held_out is not None and len(held_out) == 0:
        raise UserError(f"{cfg.val_path or cfg.path}: no evaluation samples left")
    return train, held_out, report


def prepare_text_classification(
    cfg: DataConfig, tokenizer: Any, seed: int, labelled: bool = True
) -> TaskData:
    """input_ids and a class id per sample; label names from data.labels or the training rows."""
    split = read_split(cfg, seed, labelled)
    names = resolve_labels(split, cfg) if labelled else list(cfg.labels or [])

    def labels(kept: list[Row]) -> dict[str, list[Any]]:
        return {"label": label_ids(kept, names) if labelled else [-1] * len(kept)}

    train, held_out, report = _encode_split(split, tokenizer, cfg, labels)
    if labelled:
        report.classes = class_counts(train["label"], names)
    return TaskData(train, held_out, report, names)


def prepare_masked_lm(cfg: DataConfig, tokenizer: Any, seed: int, labelled: bool = True) -> TaskData:
    """input_ids per sample (raw text, special tokens added); masking happens per batch, see the module doc."""
    if tokenizer.mask_token_id is None:
        raise UserError("model.tokenizer: masked_lm needs a tokenizer with a mask token (e.g. [MASK])")
    train, held_out, report = _encode_split(read_split(cfg, seed), tokenizer, cfg, lambda kept: {})
    return TaskData(train, held_out, report)


# ---- batching ----------------------------------------------------------------------------------------------


def collate_classification(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask; `labels` (one class id per sample) when known."""
    import torch

    batch = {
        "input_ids": pad([s["input_ids"] for s in samples], pad_id),
        "attention_mask": attention_mask([s["input_ids"] for s in samples]),
    }
    if all(s["label"] >= 0 for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


class MaskingCollator:
    """Pads samples and masks each one with its own seeded generator (see the module docstring)."""

    def __init__(self, tokenizer: Any, mask_rate: float, seed: int, pad_id: int) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.rule = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_rate)
        self.seed = seed
        self.pad_id = pad_id

    def mask(self, input_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        import torch

        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        digest = zlib.crc32(ids.numpy().tobytes())
        self.rule.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + digest)
        inputs, labels = self.rule.torch_mask_tokens(ids)
        return inputs[0].tolist(), labels[0].tolist()

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        masked = [self.mask(s["input_ids"]) for s in samples]
        return {
            "input_ids": pad([inputs for inputs, _ in masked], self.pad_id),
            "attention_mask": attention_mask([s["input_ids"] for s in samples]),
            "labels": pad([labels for _, labels in masked], IGNORE_INDEX),
        }
