"""Encoder text samples (classification, masked LM): data.overlong on rows longer than max_seq_len."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.data.encoder_text import prepare_masked_lm, prepare_text_classification
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig

LONG = "today the soup was great " * 10  # ~50 word pieces
ROWS = [
    {"text": "today the soup was great", "label": "food"},
    {"text": LONG, "label": "food"},
    {"text": "today the wind was bad", "label": "weather"},
]


@pytest.fixture
def bert_tokenizer(tiny_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def _config(tmp_path: Path, **fields: Any) -> DataConfig:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return DataConfig(path=str(path), format="classification", val_fraction=0.0, max_seq_len=16, **fields)


def test_overlong_rows_are_truncated_with_their_special_tokens(bert_tokenizer: Any, tmp_path: Path) -> None:
    data = prepare_text_classification(_config(tmp_path, overlong="truncate"), bert_tokenizer, seed=0)
    by_row = {row: ids for row, ids in zip(data.train["row"], data.train["input_ids"], strict=True)}
    assert len(by_row) == 3 and data.report.truncated == 1
    long_ids = by_row[2]  # rows are numbered from 1
    assert len(long_ids) == 16
    assert long_ids[0] == bert_tokenizer.cls_token_id and long_ids[-1] == bert_tokenizer.sep_token_id
    assert by_row[1] == bert_tokenizer(ROWS[0]["text"])["input_ids"], "short rows are untouched"


def test_overlong_rows_are_dropped_or_refused_by_row(bert_tokenizer: Any, tmp_path: Path) -> None:
    data = prepare_masked_lm(_config(tmp_path, overlong="drop"), bert_tokenizer, seed=0)
    assert sorted(data.train["row"]) == [1, 3] and data.report.dropped_overlong == 1
    with pytest.raises(
        UserError, match=r"rows.jsonl: row 2: sample is \d+ tokens, longer than data.max_seq_len=16"
    ):
        prepare_text_classification(_config(tmp_path, overlong="error"), bert_tokenizer, seed=0)
