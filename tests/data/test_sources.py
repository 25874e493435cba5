"""Reading data files and the pre-flight check: every bad input gets one exact, actionable line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from peftrun.data import sources
from peftrun.data.sources import Located, check_source, is_hub_id, locate, read_rows
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig


def _jsonl(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# (file name, file content, DataConfig fields, expected error; {abs} is the file's absolute path)
BAD_INPUTS = [
    pytest.param("nope.jsonl", None, {}, "data.path: file not found: {abs}", id="missing-file"),
    pytest.param(
        "x.tsv",
        "a\tb\n",
        {},
        "data.path: unsupported file type '.tsv' ({abs}); use one of .json, .jsonl, .csv, .parquet, .txt",
        id="bad-extension",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD, GOOD, '{"instruction": "a", "output": }'),
        {},
        "x.jsonl: line 3: invalid JSON (Expecting value at column 32)",
        id="bad-json-line",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD, "[1, 2]"),
        {},
        "x.jsonl: line 2: expected a JSON object, got a list",
        id="not-an-object",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD, {"instruction": "q", "input": "", "answer": "a"}),
        {},
        "x.jsonl: row 2: missing 'output' (columns: instruction, input, answer); map it with data.columns",
        id="missing-column",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl({"instruction": "q", "input": "", "answer": "a"}),
        {"columns": {"output": "response"}},
        "x.jsonl: row 1: missing 'response' (data.columns maps output to it; columns: instruction, input, answer)",
        id="missing-mapped-column",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD, "", "", {"instruction": "q"}),
        {},
        "x.jsonl: row 2 (line 4): missing 'output' (columns: instruction); map it with data.columns",
        id="row-and-line-differ",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl({"instruction": "q", "output": 42}),
        {},
        "x.jsonl: row 1: 'output' must be a string, got int",
        id="wrong-type",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl({"instruction": None, "output": "a"}),
        {},
        "x.jsonl: row 1: 'instruction' must be a string, got null",
        id="null-required",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl(
            CHAT_OK, {"messages": [{"role": "user", "content": "hi"}, {"role": "human", "content": "yo"}]}
        ),
        {"format": "chat"},
        "c.jsonl: row 2: messages[1] has unknown role 'human' (known: system, user, assistant, tool)",
        id="unknown-role",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl({"messages": "hi"}),
        {"format": "chat"},
        "c.jsonl: row 1: 'messages' must be a non-empty list of {role, content}, got a string",
        id="messages-not-a-list",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl({"messages": []}),
        {"format": "chat"},
        "c.jsonl: row 1: 'messages' must be a non-empty list of {role, content}, got an empty list",
        id="messages-empty",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl({"messages": [{"role": "user", "content": None}]}),
        {"format": "chat"},
        "c.jsonl: row 1: messages[0].content must be a string, got null",
        id="content-null",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl({"conversation": []}),
        {"format": "chat"},
        "c.jsonl: row 1: missing 'messages' (columns: conversation); map it with data.columns, or give "
        "ShareGPT 'conversations' or 'prompt' and 'completion'",
        id="chat-missing-messages",
    ),
    pytest.param(
        "x.csv",
        "instruction,input,output\nq,,a\nq,a\n",
        {},
        "x.csv: row 2: has 2 fields, the header has 3",
        id="csv-field-count",
    ),
    pytest.param(
        "x.json",
        json.dumps({"data": [GOOD]}),
        {},
        "x.json: expected a JSON array of objects, got an object with keys data",
        id="json-object",
    ),
    pytest.param(
        "x.json",
        f"[{json.dumps(GOOD)}, ",  # a JSON array is streamed: row 1 is read (and checked) first
        {},
        "x.json: invalid JSON (Expecting value at line 1 column 63)",
        id="json-broken",
    ),
    pytest.param(
        "x.txt",
        "some text\n",
        {},
        "data.path: x.txt is raw text; a .txt file can only be used with data.format: text",
        id="txt-not-text-format",
    ),
    pytest.param(
        "x.csv",
        "messages\nhi\n",
        {"format": "chat"},
        "data.path: x.csv: chat messages are nested lists, which CSV cannot hold; use .jsonl",
        id="csv-chat",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD),
        {"columns": {"answer": "output"}},
        "data.columns: 'answer' is not a column of format alpaca (peftrun's names: instruction, input, output)",
        id="unknown-column-key",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD),
        {"columns": {"outptu": "answer"}},
        "data.columns: 'outptu' is not a column of format alpaca; did you mean 'output'? "
        "(peftrun's names: instruction, input, output)",
        id="column-key-typo",
    ),
    pytest.param("x.jsonl", "\n\n", {}, "x.jsonl: no rows", id="empty-file"),
    pytest.param(
        "x.jsonl",
        b"\xff\xfe{}\n",
        {},
        "x.jsonl: not UTF-8 text (byte 0xff at line 1, column 1)",
        id="not-utf8",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD, GOOD).encode() + b'{"instruction": "caf\xe9", "output": "a"}\n',
        {},
        "x.jsonl: not UTF-8 text (byte 0xe9 at line 3, column 21)",
        id="not-utf8-line-3",
    ),
    pytest.param(
        "c.jsonl",
        _jsonl({"messages": [{"role": "user"}]}),
        {"format": "chat"},
        "c.jsonl: row 1: messages[0] is missing 'content' (keys: role)",
        id="content-missing",
    ),
    pytest.param(
        "x.jsonl",
        _jsonl(GOOD),
        {"val_path": "val.jsonl"},
        "data.val_path: file not found: {dir}/val.jsonl",
        id="missing-val-file",
    ),
]


@pytest.mark.parametrize(("name", "content", "fields", "expected"), BAD_INPUTS)
def test_check_source_bad_inputs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    content: str | bytes | None,
    fields: dict,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    elif content is not None:
        (tmp_path / name).write_text(content)
    cfg = DataConfig(path=name, **fields)
    with pytest.raises(UserError) as caught:
        check_source(cfg)
    expected = expected.replace("{abs}", str((tmp_path / name).resolve())).replace(
        "{dir}", str(tmp_path.resolve())
    )
    assert str(caught.value) == expected


def test_directory_is_not_a_data_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is a directory with no data files .* point it at a data file"):
        check_source(DataConfig(path=str(tmp_path)))


def test_only_the_rows_used_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(_jsonl(GOOD, GOOD, {"instruction": "no output"}))
    check_source(DataConfig(path=str(path), max_samples=2))
    with pytest.raises(UserError, match="row 3: missing 'output'"):
        check_source(DataConfig(path=str(path)))


def test_good_files_of_every_format_pass(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(_jsonl(GOOD, {"instruction": "q", "input": None, "output": "a"}))
    (tmp_path / "a.json").write_text(json.dumps([GOOD, GOOD]))
    (tmp_path / "a.csv").write_text("instruction,input,output\nq,,a\n")
    (tmp_path / "c.jsonl").write_text(_jsonl(CHAT_OK))
    (tmp_path / "t.txt").write_text("para one\n\npara two\n")
    for cfg in [
        DataConfig(path=str(tmp_path / "a.jsonl")),
        DataConfig(path=str(tmp_path / "a.json"), val_path=str(tmp_path / "a.csv")),
        DataConfig(path=str(tmp_path / "c.jsonl"), format="chat"),
        DataConfig(path=str(tmp_path / "t.txt"), format="text"),
    ]:
        check_source(cfg)  # raises on any problem


# --------------------------------------------------------------------------------------------- reading


def test_read_rows_every_local_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {"instruction": "Name a color.", "input": "", "output": "Blue"}]
    (tmp_path / "a.jsonl").write_text(_jsonl(*rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text(_jsonl(*rows))  # JSON Lines saved as .json
    (tmp_path / "a.csv").write_text(
        "instruction,input,output\nAdd 2 and 3.,,5\nName a color.,,Blue\n", encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ["a.jsonl", "a.json", "lines.json", "a.csv", "a.parquet"]:
        assert read_rows(str(tmp_path / name)).to_list() == rows, name


def test_txt_is_one_sample_per_paragraph(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("First line\nsecond line\n\n\n  \nNext paragraph.\n\nLast one")
    texts = read_rows(str(tmp_path / "t.txt"))["text"]
    assert texts == ["First line\nsecond line", "Next paragraph.", "Last one"]


def test_read_rows_max_samples_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        _jsonl(*({"q": f"q{i}", "a": f"a{i}", "noise": [i] if i % 2 else "x"} for i in range(10)))
    )
    rows = read_rows(str(path), max_samples=3, columns=["q", "a", "missing"])
    assert rows.column_names == ["q", "a", "missing"]
    assert rows.to_list() == [{"q": f"q{i}", "a": f"a{i}", "missing": None} for i in range(3)]


# ------------------------------------------------------------------------------------------------- Hub


@pytest.mark.parametrize(
    ("path", "hub"),
    [
        ("tatsu-lab/alpaca", True),
        ("imdb", True),
        ("bigcode/the-stack-v1.2", True),
        ("data/train.jsonl", False),
        ("./alpaca", False),
        ("/abs/dir/file", False),
        ("a/b/c", False),
        ("notes.txt", False),
    ],
)
def test_is_hub_id(path: str, hub: bool) -> None:
    assert is_hub_id(path) is hub


def test_unreachable_hub_fails_fast_naming_data_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    start = time.perf_counter()
    with pytest.raises(UserError) as caught:
        read_rows("someone/some-dataset")
    assert time.perf_counter() - start < 1.0
    assert str(caught.value) == (
        "data.path: 'someone/some-dataset' is not a local file, and the Hugging Face Hub cannot be reached to "
        "load it as a dataset (Name or service not known); download it first, or set HF_HUB_OFFLINE=1 to use "
        "a cached copy"
    )


def test_offline_hub_without_a_cached_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(sources.hub, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(
        UserError, match=r"^data.path: cannot load Hub dataset 'someone/some-dataset' offline"
    ):
        check_source(DataConfig(path="someone/some-dataset"))
    assert time.perf_counter() - start < 2.0


def test_hub_dataset_rows_are_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows: list[dict[str, Any]] = [
        GOOD,
        {**GOOD, "output": "6"},
        {"instruction": "q", "input": "", "output": None},
    ]
    calls: list[dict[str, Any]] = []

    def fake_load_dataset(path: str, **kwargs: Any) -> datasets.Dataset:
        calls.append({"path": path, **kwargs})
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(sources.hub, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    read = read_rows("org/alpaca-like", "test", max_samples=2, columns=["instruction", "output"])
    assert read.to_list() == [{"instruction": r["instruction"], "output": r["output"]} for r in rows[:2]]
    assert (calls[0]["path"], calls[0]["split"]) == ("org/alpaca-like", "test")
    check_source(DataConfig(path="org/alpaca-like", max_samples=2))
    with pytest.raises(UserError) as caught:
        check_source(DataConfig(path="org/alpaca-like"))
    assert str(caught.value) == "org/alpaca-like: row 3: 'output' must be a string, got null"


def test_a_json_array_streams_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftrun.data.sources import readers

    monkeypatch.setattr(readers, "_JSON_CHUNK", 7)  # every object, string and delimiter is cut somewhere
    rows = [{**GOOD, "output": f"answer {i} \u00e9 [x], {{y}}"} for i in range(20)]
    (tmp_path / "a.json").write_text(" \n[\n" + ",\n  ".join(json.dumps(r) for r in rows) + "\n]\n")
    assert read_rows(str(tmp_path / "a.json")).to_list() == rows
    (tmp_path / "empty.json").write_text("[ ]")
    with pytest.raises(UserError, match=r"empty.json: no rows"):
        check_source(DataConfig(path=str(tmp_path / "empty.json")))
    for broken in [
        "[" + json.dumps(GOOD) + " " + json.dumps(GOOD) + "]",  # no comma
        "[" + json.dumps(GOOD) + "] []",  # more after the array
        "[" + json.dumps(GOOD) + ",]",  # trailing comma
    ]:
        (tmp_path / "b.json").write_text(broken)
        with pytest.raises(json.JSONDecodeError) as parsed:
            json.loads(broken)
        with pytest.raises(UserError) as caught:
            check_source(DataConfig(path=str(tmp_path / "b.json")))
        where = f"{parsed.value.msg} at line {parsed.value.lineno} column {parsed.value.colno}"
        assert str(caught.value) == f"{tmp_path / 'b.json'}: invalid JSON ({where})"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with a BOM; each text format reads past it."""
    for name, text in (("a.jsonl", _jsonl(GOOD)), ("a.json", json.dumps([GOOD])), ("a.txt", "hello\n")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        fmt = "text" if name.endswith(".txt") else "alpaca"
        check_source(DataConfig(path=str(tmp_path / name), format=fmt))
        first = read_rows(str(tmp_path / name))[0]
        assert first == ({"text": "hello"} if fmt == "text" else GOOD)


# ------------------------------------------------------------------------------- kinds of data paths


def _shards(folder: Path, count: int = 3, rows: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(count):
        path = folder / f"part-{shard:02d}.jsonl"
        path.write_text(_jsonl(*({**GOOD, "output": f"{shard}-{row}"} for row in range(rows))))
        paths.append(path.resolve())
    return paths


def test_locate_every_kind_of_path(tmp_path: Path) -> None:
    import datasets

    shards = _shards(tmp_path / "shards")
    (tmp_path / "shards" / "README.md").write_text("not data")
    (tmp_path / "nested" / "b").mkdir(parents=True)
    (tmp_path / "nested" / "b" / "z.jsonl").write_text(_jsonl(GOOD))
    (tmp_path / "nested" / "a.jsonl").write_text(_jsonl(GOOD))
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "images" / "cat").mkdir(parents=True)
    key = "data.path"
    assert locate(str(shards[0]), key) == Located("files", str(shards[0]), (shards[0],))
    assert locate(str(tmp_path / "shards"), key, "alpaca").files == tuple(shards)
    assert locate(str(tmp_path / "shards" / "*.jsonl"), key).files == tuple(shards)
    assert [p.name for p in locate(str(tmp_path / "nested"), key, "alpaca").files] == ["a.jsonl", "z.jsonl"]
    assert locate(str(tmp_path / "saved"), key).kind == "saved"
    assert locate(str(tmp_path / "dict"), key).kind == "saved"
    assert locate(str(tmp_path / "images"), key, "images").kind == "images"
    assert locate("org/some-dataset", key) == Located("hub", "org/some-dataset")
    with pytest.raises(UserError, match=r"^data.path: empty path$"):
        locate(" ", key)


@pytest.mark.parametrize(
    ("make", "path", "expected"),
    [
        (lambda d: None, "shards/*.jsonl", "data.datasets[1].path: no file matches {dir}/shards/*.jsonl"),
        (
            lambda d: [
                (d / "mix").mkdir(),
                (d / "mix" / "a.jsonl").write_text("{}"),
                (d / "mix" / "b.csv").write_text(""),
            ],
            "mix",
            "data.datasets[1].path: mix mixes file types (.csv, .jsonl); shards must be of one type",
        ),
        (
            lambda d: [(d / "g").mkdir(), (d / "g" / "a.tsv").write_text("")],
            "g/*",
            "data.datasets[1].path: unsupported file type '.tsv' ({dir}/g/a.tsv); use one of .json, .jsonl, .csv, "
            ".parquet, .txt",
        ),
    ],
    ids=["glob-matches-nothing", "mixed-types", "glob-unsupported"],
)
def test_bad_shard_paths_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, path: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    (tmp_path / "a.jsonl").write_text(_jsonl(GOOD))
    with pytest.raises(UserError) as caught:
        check_source(DataConfig(datasets=[{"path": "a.jsonl"}, {"path": path}]))
    assert str(caught.value) == expected.replace("{dir}", str(tmp_path.resolve()))


def test_a_bad_row_in_a_shard_names_the_shard_and_its_row(tmp_path: Path) -> None:
    shards = _shards(tmp_path / "shards")
    shards[1].write_text(_jsonl(GOOD, {"instruction": "q", "answer": "a"}))
    with pytest.raises(UserError) as caught:
        check_source(DataConfig(path=str(tmp_path / "shards")))
    assert str(caught.value).startswith(f"{shards[1]}: row 2: missing 'output'")
    # max_samples counts rows over the shards in order: the first shard and a half do not reach the bad row
    check_source(DataConfig(path=str(tmp_path / "shards" / "*.jsonl"), max_samples=3))


def test_each_dataset_is_checked_with_its_own_format_and_columns(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(_jsonl(GOOD))
    (tmp_path / "q.jsonl").write_text(_jsonl({"question": "q", "answer": "a"}))
    (tmp_path / "c.jsonl").write_text(_jsonl(CHAT_OK))
    entries: list[dict[str, Any]] = [
        {"path": str(tmp_path / "a.jsonl")},
        {"path": str(tmp_path / "q.jsonl"), "columns": {"instruction": "question", "output": "answer"}},
        {"path": str(tmp_path / "c.jsonl"), "format": "chat"},
    ]
    check_source(DataConfig(datasets=entries))
    entries[1]["columns"] = {"instrucion": "question"}
    with pytest.raises(UserError) as caught:
        check_source(DataConfig(datasets=entries))
    assert str(caught.value).startswith(
        "data.datasets[1].columns: 'instrucion' is not a column of format alpaca; did you mean 'instruction'?"
    )


def test_a_saved_dataset_dict_needs_an_existing_split(tmp_path: Path) -> None:
    import datasets

    splits = {"train": datasets.Dataset.from_list([GOOD]), "validation": datasets.Dataset.from_list([GOOD])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    check_source(DataConfig(datasets=[{"path": str(tmp_path / "dict"), "val_split": "validation"}]))
    with pytest.raises(UserError) as caught:
        check_source(DataConfig(datasets=[{"path": str(tmp_path / "dict"), "split": "validaton"}]))
    assert str(caught.value) == (
        f"data.datasets[0].path: {tmp_path / 'dict'} has no split 'validaton'; did you mean 'validation'? "
        "(splits: train, validation)"
    )


def test_hub_load_args_name_the_subset_split_and_files() -> None:
    assert sources.hub_load_args("org/d", "test", "en", ("en/*.parquet",)) == {
        "path": "org/d",
        "name": "en",
        "split": "test",
        "data_files": ["en/*.parquet"],
        "streaming": False,
        "cache_dir": None,
    }
    assert sources.hub_load_args("org/d", "train")["name"] is None


def test_a_hub_dataset_entry_reaches_load_dataset_with_its_subset_split_and_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    calls: list[dict[str, Any]] = []

    def load_dataset(**kwargs: Any) -> datasets.Dataset:
        calls.append(kwargs)
        return datasets.Dataset.from_list([GOOD])

    monkeypatch.setattr(sources.hub, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    entry = {
        "path": "org/d",
        "subset": "en",
        "split": "test",
        "data_files": ["en/*.parquet"],
        "val_split": "dev",
    }
    check_source(DataConfig(datasets=[entry]))
    assert [(c["path"], c["name"], c["split"], c["data_files"]) for c in calls] == [
        ("org/d", "en", "test", ["en/*.parquet"]),
        ("org/d", "en", "dev", ["en/*.parquet"]),
    ]
