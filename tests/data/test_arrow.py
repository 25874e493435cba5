"""Tokenizing a source into Arrow files: one output row per input row, the same tokens with worker
processes, chunked map calls, counts from columns, and bad rows named from inside a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftrun.data.arrow import column, default_num_proc, tokenize_source
from peftrun.data.progress import Progress
from peftrun.data.sources import read_rows
from peftrun.data.tokenize import SampleEncoder, TokenizeStats
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig
from tests.data.test_prepare import alpaca_rows, tok, write_jsonl

__all__ = ["tok"]  # the tokenizer fixture, shared with test_prepare


def rows_with_drops(n: int) -> list[dict[str, str]]:
    rows = alpaca_rows(n)
    rows[5]["output"] = " "  # nothing to learn
    rows[n - 2]["output"] = "apple " * 80  # over max_seq_len: truncated
    return rows


def tokenized(
    tok: Any, tmp: Path, rows: list[dict[str, str]], num_proc: int, chunk_rows: int, **cfg: Any
) -> Any:
    path = write_jsonl(tmp / "a.jsonl", rows)
    data_cfg = DataConfig(path=str(path), max_seq_len=48, **cfg)
    encoder = SampleEncoder(tok, data_cfg, str(path))
    source = read_rows(str(path))
    lines: list[str] = []
    progress = Progress("tokenizing a.jsonl", len(source), lines.append, interval_s=0.0)
    out = tmp / f"work-{num_proc}-{chunk_rows}"
    return tokenize_source(encoder, source, out, num_proc, progress, chunk_rows=chunk_rows), encoder, lines


def test_worker_processes_and_chunks_give_the_same_tokens(tok: Any, tmp_path: Path) -> None:
    rows = rows_with_drops(120)
    one, encoder, _ = tokenized(tok, tmp_path, rows, num_proc=1, chunk_rows=1000)
    two, _, lines = tokenized(tok, tmp_path, rows, num_proc=2, chunk_rows=50)
    assert two.dataset.to_list() == one.dataset.to_list()
    assert two.stats == one.stats
    assert len(lines) == 3 and lines[-1].startswith("data: tokenizing a.jsonl: 120 of 120 rows (")
    assert all(Path(f["filename"]).is_relative_to(tmp_path) for f in two.dataset.cache_files)

    # The columns agree with the encoder run on the rows directly.
    samples, stats = encoder.encode(rows)
    kept = one.dataset.select(one.kept_indices())
    assert [s.input_ids for s in samples] == kept["input_ids"]
    assert [s.labels for s in samples] == kept["labels"]
    assert [s.row for s in samples] == kept["row"]
    assert one.stats == stats
    assert (stats.rows, stats.kept, stats.dropped_empty, stats.truncated) == (120, 119, 1, 1)
    assert column(one.dataset, "row").tolist() == list(range(1, 121))  # every row, dropped ones too
    assert one.dataset[5]["input_ids"] == [] and one.dataset[5]["dropped"] == 2


def test_a_bad_row_in_a_worker_is_the_same_one_line_error(tok: Any, tmp_path: Path) -> None:
    rows = rows_with_drops(120)
    with pytest.raises(UserError) as raised:
        tokenized(tok, tmp_path, rows, num_proc=2, chunk_rows=1000, overlong="error")
    assert str(raised.value).startswith(f"{tmp_path / 'a.jsonl'}: row 119: sample is ")


def test_stats_sum() -> None:
    total = TokenizeStats(rows=2, kept=1)
    total += TokenizeStats(rows=3, kept=3, truncated=1)
    assert (total.rows, total.kept, total.truncated) == (5, 4, 1)


def test_default_num_proc() -> None:
    assert default_num_proc(1_000, cpus=16) == 1  # forking costs more than it saves
    assert default_num_proc(100_000, cpus=16) == 5
    assert default_num_proc(10_000_000, cpus=16) == 8
    assert default_num_proc(10_000_000, cpus=2) == 2


def test_chat_rows_of_a_known_template_in_worker_processes(tok: Any, tmp_path: Path) -> None:
    """The chat encoder (template family, turn markers) is pickled into the workers and gives the same tokens."""
    from peftrun.data.templates import CHAT_TEMPLATES

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": f"apple {i}"},
            ]
        }
        for i in range(60)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(path=str(path), format="chat", chat_template="chatml")
    encoder = SampleEncoder(tok, cfg, str(path), CHAT_TEMPLATES["chatml"])
    assert encoder.chat is not None and encoder.chat.known
    source = read_rows(str(path), columns=["messages"], as_json=True)
    found = [
        tokenize_source(encoder, source, tmp_path / str(n), n, Progress("x", len(source), None)).dataset
        for n in (1, 2)
    ]
    assert found[0].to_list() == found[1].to_list()
    samples, _ = encoder.encode([dict(r) for r in source])
    assert found[0]["input_ids"] == [s.input_ids for s in samples]
