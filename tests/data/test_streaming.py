"""data.streaming: the stream holds what the prepared data holds, shuffled from the seed, packed on the fly,
and a run trained from it resumes exactly."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from peftrun.data import prepare_data
from peftrun.data.streaming import CHECK_ROWS, StreamingSamples, prepare_stream
from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.recipe.schema import DataConfig
from peftrun.train.loop import train


def _rows(count: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i % 7 + 1)))}
        for i in range(count)
    ]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _key(sample: dict[str, list[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(sample["input_ids"]), tuple(sample["labels"])


def _one_pass(stream: Any) -> list[dict[str, list[int]]]:
    return list(iter(stream))


def test_stream_holds_the_prepared_samples_shuffled_by_seed_and_pass(
    tiny_llama: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = _write(tmp_path / "rows.jsonl", _rows(300))
    cfg = DataConfig(path=str(data), max_seq_len=256, streaming=True, shuffle_buffer=100)
    stream = prepare_stream(cfg, tokenizer, seed=3, cache_dir=tmp_path / "cache").train
    assert isinstance(stream, StreamingSamples)
    first = _one_pass(stream)
    prepared = prepare_data(
        cfg.model_copy(update={"streaming": False}), tokenizer, 3, tmp_path / "cache"
    ).train
    assert Counter(map(_key, first)) == Counter(_key(prepared[i]) for i in range(len(prepared)))
    assert [_key(s) for s in first] != [_key(prepared[i]) for i in range(len(prepared))], "shuffled"
    again = prepare_stream(cfg, tokenizer, seed=3, cache_dir=tmp_path / "cache").train
    assert [_key(s) for s in _one_pass(again)] == [_key(s) for s in first], "the seed decides the order"
    stream.set_epoch(1)
    second_pass = _one_pass(stream)
    assert Counter(map(_key, second_pass)) == Counter(map(_key, first))
    assert [_key(s) for s in second_pass] != [_key(s) for s in first], "each pass is shuffled anew"


def test_packed_stream_holds_every_sample_once_within_capacity(tiny_llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = _write(tmp_path / "rows.jsonl", _rows(200))
    cfg = DataConfig(path=str(data), max_seq_len=512, streaming=True, packing=True, shuffle_buffer=64)
    rows = _one_pass(prepare_stream(cfg, tokenizer, seed=0, cache_dir=tmp_path / "cache").train)
    unpacked = prepare_data(
        cfg.model_copy(update={"streaming": False}), tokenizer, 0, tmp_path / "cache"
    ).train
    assert all(len(row["input_ids"]) <= 512 for row in rows)
    assert len(rows) < len(unpacked) / 2, "several samples per packed row"
    starts = [i for row in rows for i, position in enumerate(row["position_ids"]) if position == 0]
    assert len(starts) == len(unpacked), "every sample once"
    assert sum(len(row["input_ids"]) for row in rows) == sum(len(ids) for ids in unpacked["input_ids"])


def test_bad_rows_are_named_up_front_or_when_the_stream_reaches_them(
    tiny_llama: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    early = _rows(50)
    early[9] = {"instruction": "no output here"}
    cfg = DataConfig(path=str(_write(tmp_path / "early.jsonl", early)), streaming=True)
    with pytest.raises(UserError, match=r"early\.jsonl: row 10: .*output"):
        prepare_stream(cfg, tokenizer, seed=0, cache_dir=tmp_path / "cache")

    late = _rows(CHECK_ROWS + 300)
    late[CHECK_ROWS + 99] = {"instruction": "no output here"}
    cfg = DataConfig(path=str(_write(tmp_path / "late.jsonl", late)), streaming=True, shuffle_buffer=10)
    stream = prepare_stream(cfg, tokenizer, seed=0, cache_dir=tmp_path / "cache").train
    with pytest.raises(UserError, match=rf"late\.jsonl: row {CHECK_ROWS + 100}: .*output"):
        list(islice(iter(stream), len(late)))


def test_streaming_needs_max_steps_and_no_held_out_fraction(write_recipe: Any) -> None:
    with pytest.raises(UserError, match=r"train\.max_steps"):
        load_recipe(write_recipe(data={"streaming": True}, train={"max_steps": None}))
    with pytest.raises(UserError, match="val_path"):
        load_recipe(write_recipe(data={"streaming": True, "val_fraction": 0.2}))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_streamed_run_resumes_exactly(write_recipe: Any, tmp_path: Path, packing: bool) -> None:
    """Stop at step 3, resume to 7: steps 4-7 have the uninterrupted run's losses. A pass over the 12
    rows is 6 steps padded, 4 packed, so the resumed part crosses into the stream's reshuffled second pass."""
    recipe = write_recipe(
        method={"dropout": 0.1},
        data={
            "streaming": True,
            "shuffle_buffer": 8,
            "packing": packing,
            "max_seq_len": 512 if packing else 256,
        },
        train={"max_steps": 7, "lr": 1e-2, "micro_batch_size": 1 if packing else 2, "scheduler": "constant"},
        checkpoint={"every_steps": 3, "at_end": True},
    )
    full = train(load_recipe(recipe, [f"output_dir={tmp_path / 'full'}"]))
    first = train(load_recipe(recipe, [f"output_dir={tmp_path / 'split'}", "train.max_steps=3"]))
    second = train(load_recipe(recipe, [f"output_dir={tmp_path / 'split'}", "train.resume=auto"]))
    assert first.steps == 3 and second.steps == 7 and len(second.losses) == 4
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=1e-5, atol=0
    )
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["data"]["streaming"] is True
    metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line).get("epoch", 0) for line in metrics) >= 1, "a second pass was trained"


def test_a_stream_too_short_for_one_step_is_an_error_not_a_hang(write_recipe: Any, tmp_path: Path) -> None:
    rows = _write(tmp_path / "two.jsonl", _rows(2))
    recipe = write_recipe(
        data={"path": str(rows), "streaming": True},
        train={"max_steps": 2, "micro_batch_size": 1, "grad_accum_steps": 4},
    )
    with pytest.raises(UserError, match="no optimizer step"):
        train(load_recipe(recipe))
