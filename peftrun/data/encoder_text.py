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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftrun.data.rows import (
    Row,
    SampleReport,
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
    full = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    cut = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=cfg.max_seq_len)["input_ids"]
    kept_ids, kept_rows = [], []
    for row, whole, truncated in zip(rows, full, cut, strict=True):
        if len(whole) <= cfg.max_seq_len:
            kept_ids.append(list(whole))
        elif cfg.overlong == "error":
            raise UserError(
                f"{row.source}: row {row.number}: sample is {len(whole)} tokens, longer than "
                f"data.max_seq_len={cfg.max_seq_len}; raise it, or set data.overlong to truncate or drop"
            )
        elif cfg.overlong == "drop":
            report.dropped_overlong += 1
            continue
        else:
            report.truncated += 1
            kept_ids.append(list(truncated))
        kept_rows.append(row)
    return kept_ids, kept_rows


def _dataset(columns: dict[str, list[Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(columns)


def prepare_text_classification(
    cfg: DataConfig, tokenizer: Any, seed: int, labelled: bool = True
) -> TaskData:
    """input_ids and a class id per sample; label names from data.labels or the training rows."""
    split = read_split(cfg, seed, labelled)
    names = resolve_labels(split, cfg) if labelled else list(cfg.labels or [])
    report = SampleReport(split.rows, 0, 0)

    def build(rows: list[Row]) -> Any:
        ids, kept = _encode(rows, tokenizer, cfg, report)
        labels = label_ids(kept, names) if labelled else [-1] * len(kept)
        return _dataset({"input_ids": ids, "label": labels, "row": [r.number for r in kept]})

    train = build(split.train)
    held_out = build(split.eval) if split.eval is not None else None
    report.train_samples, report.eval_samples = len(train), len(held_out) if held_out is not None else 0
    if labelled:
        report.classes = class_counts(train["label"], names)
    _require_samples(cfg, train, held_out, report)
    return TaskData(train, held_out, report, names)


def prepare_masked_lm(cfg: DataConfig, tokenizer: Any, seed: int, labelled: bool = True) -> TaskData:
    """input_ids per sample (raw text, special tokens added); masking happens per batch, see the module doc."""
    if tokenizer.mask_token_id is None:
        raise UserError("model.tokenizer: masked_lm needs a tokenizer with a mask token (e.g. [MASK])")
    split = read_split(cfg, seed)
    report = SampleReport(split.rows, 0, 0)

    def build(rows: list[Row]) -> Any:
        ids, kept = _encode(rows, tokenizer, cfg, report)
        return _dataset({"input_ids": ids, "row": [r.number for r in kept]})

    train = build(split.train)
    held_out = build(split.eval) if split.eval is not None else None
    report.train_samples, report.eval_samples = len(train), len(held_out) if held_out is not None else 0
    _require_samples(cfg, train, held_out, report)
    return TaskData(train, held_out, report)


def _require_samples(cfg: DataConfig, train: Any, held_out: Any, report: SampleReport) -> None:
    if len(train) == 0:
        raise UserError(f"{cfg.path}: no training samples left ({'; '.join(report.lines()[:2])})")
    if held_out is not None and len(held_out) == 0:
        raise UserError(f"{cfg.val_path or cfg.path}: no evaluation samples left")


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
