"""read_source: every kind of dataset path becomes memory-mapped rows with a content identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.data import sources
from peftrun.data.source_rows import read_source
from peftrun.data.sources import ROW_JSON
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig


def _row(i: int) -> dict[str, Any]:
    return {"instruction": f"q{i}", "input": "", "output": f"a{i}"}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _read(tmp_path: Path, **data: Any) -> list[Any]:
    cfg = DataConfig(**data)
    return [read_source(s, cfg, cache_dir=tmp_path / "cache") for s in cfg.sources()]


def test_shards_a_glob_and_a_parquet_file_load_in_order(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "shards").mkdir()
    for shard in range(3):
        (tmp_path / "shards" / f"part-{shard}.jsonl").write_text(
            _jsonl([_row(2 * shard), _row(2 * shard + 1)])
        )
    pq.write_table(pa.Table.from_pylist([_row(i) for i in range(4)]), tmp_path / "a.parquet")
    folder, glob, parquet = _read(
        tmp_path,
        datasets=[
            {"path": str(tmp_path / "shards")},
            {"path": str(tmp_path / "shards" / "part-[12].jsonl")},
            {"path": str(tmp_path / "a.parquet")},
        ],
    )
    assert folder.train.to_list() == [_row(i) for i in range(6)]
    assert glob.train.to_list() == [_row(i) for i in range(2, 6)]
    assert parquet.train.to_list() == [_row(i) for i in range(4)]
    for rows in (folder, glob, parquet):
        assert rows.train.cache_files, "rows are memory-mapped Arrow files, not Python lists"
        assert rows.eval is None
    assert folder.identity[0].startswith("sha256:") and folder.identity[0].count(",") == 2


def test_max_samples_counts_over_the_shards(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    for shard in range(3):
        (tmp_path / "shards" / f"{shard}.jsonl").write_text(_jsonl([_row(2 * shard), _row(2 * shard + 1)]))
    (rows,) = _read(tmp_path, path=str(tmp_path / "shards"), max_samples=3)
    assert rows.train["output"] == ["a0", "a1", "a2"]


def test_a_saved_dataset_and_a_dataset_dict_split_load(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{**_row(0), "extra": 1}]).save_to_disk(str(tmp_path / "saved"))
    splits = {"train": [_row(1), _row(2)], "validation": [_row(3)]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dict")
    )
    saved, dict_rows = _read(
        tmp_path,
        datasets=[
            {"path": str(tmp_path / "saved")},
            {"path": str(tmp_path / "dict"), "val_split": "validation"},
        ],
    )
    assert saved.train.to_list() == [_row(0)]  # only the columns the format reads
    assert dict_rows.train.to_list() == splits["train"]
    assert dict_rows.eval is not None and dict_rows.eval.to_list() == splits["validation"]
    assert [i.split(":")[:2] for i in dict_rows.identity] == [["saved", "train"], ["saved", "validation"]]


def test_rows_are_stored_as_the_encoder_reads_them(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "id": 7}
    (tmp_path / "c.jsonl").write_text(_jsonl([chat]))
    (tmp_path / "q.jsonl").write_text(_jsonl([{"question": "q", "answer": "a"}]))
    chat_rows, text_rows = _read(
        tmp_path,
        datasets=[
            {"path": str(tmp_path / "c.jsonl"), "format": "chat"},
            {"path": str(tmp_path / "q.jsonl"), "columns": {"instruction": "question", "output": "answer"}},
        ],
    )
    assert chat_rows.train.column_names == [ROW_JSON]
    assert json.loads(chat_rows.train[0][ROW_JSON]) == {"messages": chat["messages"]}
    # the checked fields under the file's names; the absent optional input reads as ""
    assert text_rows.train.to_list() == [{"question": "q", "input": "", "answer": "a"}]


def test_a_bad_row_is_one_line_naming_the_shard_and_row(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0.jsonl").write_text(_jsonl([_row(0)]))
    bad = tmp_path / "shards" / "1.jsonl"
    bad.write_text(_jsonl([_row(1)]) + '{"instruction": "q", "output": 5}\n')
    with pytest.raises(UserError) as caught:
        _read(tmp_path, path=str(tmp_path / "shards"))
    assert str(caught.value) == f"{bad.resolve()}: row 2: 'output' must be a string, got int"


def test_changed_content_is_never_served_from_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(_jsonl([_row(0)]))
    (first,) = _read(tmp_path, path=str(path))
    (again,) = _read(tmp_path, path=str(path))
    assert again.identity == first.identity
    path.write_text(_jsonl([_row(1)]))  # same size, same second: only the content differs
    (changed,) = _read(tmp_path, path=str(path))
    assert changed.identity != first.identity
    assert changed.train.to_list() == [_row(1)]


def test_a_val_path_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(_jsonl([_row(0), _row(1)]))
    (tmp_path / "v.jsonl").write_text(_jsonl([_row(2), _row(3)]))
    (rows,) = _read(
        tmp_path, path=str(tmp_path / "t.jsonl"), val_path=str(tmp_path / "v.jsonl"), max_samples=1
    )
    assert rows.train["output"] == ["a0"]
    assert rows.eval is not None and rows.eval["output"] == ["a2", "a3"]
    assert len(rows.identity) == 2


def test_a_hub_entry_loads_with_its_subset_split_and_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datasets

    calls: list[dict[str, Any]] = []

    def load_dataset(**kwargs: Any) -> datasets.Dataset:
        calls.append(kwargs)
        return datasets.Dataset.from_list([{**_row(0), "noise": 1}, _row(1)])

    monkeypatch.setattr(sources.hub, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (rows,) = _read(
        tmp_path, datasets=[{"path": "org/d", "subset": "en", "split": "test", "data_files": ["x.parquet"]}]
    )
    assert (calls[0]["path"], calls[0]["name"], calls[0]["split"], calls[0]["data_files"]) == (
        "org/d",
        "en",
        "test",
        ["x.parquet"],
    )
    assert rows.train.column_names == ["instruction", "input", "output"]
    assert rows.identity[0].startswith('hub:["org/d", "en", "test", ["x.parquet"]]:')


def test_an_image_folder_becomes_path_and_label_rows(tmp_path: Path) -> None:
    for label, names in {"cat": ["b.png", "a.jpg"], "dog": ["c.png"]}.items():
        (tmp_path / "images" / label).mkdir(parents=True)
        for name in names:
            (tmp_path / "images" / label / name).write_bytes(
                b""
            )  # the rows hold paths; pixels are read later
    (rows,) = _read(tmp_path, path=str(tmp_path / "images"), format="images")
    assert [
        (Path(r["image"]).relative_to(tmp_path / "images").as_posix(), r["label"]) for r in rows.train
    ] == [
        ("cat/a.jpg", "cat"),
        ("cat/b.png", "cat"),
        ("dog/c.png", "dog"),
    ]
    assert rows.identity[0].startswith("images:")
