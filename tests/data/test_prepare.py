"""prepare_data end to end: splits, column mapping, the on-disk cache, and batching with collate."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from peftrun.data import IGNORE_INDEX, DataReport, collate, pad_id_for, prepare_data
from peftrun.data.templates import ALPACA_NO_INPUT
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig

REPO = Path(__file__).resolve().parents[2]
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "tiger", "ocean"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from peftrun.demo.tiny import build_tokenizer

    corpus = [ALPACA_NO_INPUT, " ".join(WORDS)] * 4
    return build_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=400)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Say {WORDS[i % 10]} {i}.", "input": "", "output": f"{WORDS[i % 10]} {i}"}
        for i in range(n)
    ]


def answers(tok: Any, dataset: Any) -> list[str]:
    """The trained text of each sample (its answer and EOS)."""
    return [tok.decode([t for t in s["labels"] if t != IGNORE_INDEX]) for s in dataset]


# --------------------------------------------------------------------------------------------- splits


def test_val_fraction_split_is_seeded_and_disjoint(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(50))
    cfg = DataConfig(path=str(path), val_fraction=0.2)
    first = prepare_data(cfg, tok, seed=1, cache_dir=tmp_path / "c1")
    again = prepare_data(cfg, tok, seed=1, cache_dir=tmp_path / "c2")  # fresh cache: recomputed
    other = prepare_data(cfg, tok, seed=2, cache_dir=tmp_path / "c1")
    assert first.eval is not None and again.eval is not None and other.eval is not None
    held_out = answers(tok, first.eval)
    assert len(held_out) == 10 and len(first.train) == 40
    assert held_out == answers(tok, again.eval)
    assert set(held_out) != set(answers(tok, other.eval))
    assert set(held_out).isdisjoint(answers(tok, first.train))
    assert set(held_out) | set(answers(tok, first.train)) == {f"{r['output']}</s>" for r in alpaca_rows(50)}
    assert (first.report.train_samples, first.report.eval_samples) == (40, 10)


def test_val_path_is_the_eval_split(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(6))
    val = write_jsonl(tmp_path / "val.jsonl", alpaca_rows(9)[6:])
    data = prepare_data(DataConfig(path=str(train), val_path=str(val)), tok, 0, tmp_path / "cache")
    assert data.eval is not None
    assert answers(tok, data.eval) == ["paper 6</s>", "light 7</s>", "tiger 8</s>"]
    assert (data.report.rows, data.report.train_samples, data.report.eval_samples) == (9, 6, 3)


def test_no_split_without_val_settings(tok: Any, tmp_path: Path) -> None:
    data = prepare_data(
        DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4)))), tok, 0, tmp_path
    )
    assert data.eval is None
    assert data.train.column_names == ["input_ids", "labels", "length"]
    assert data.train["length"] == [len(ids) for ids in data.train["input_ids"]]


def test_too_small_for_a_split(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(1))), val_fraction=0.5)
    with pytest.raises(UserError, match=r"^data.val_fraction=0.5 of 1 rows leaves no rows to train on$"):
        prepare_data(cfg, tok, 0, tmp_path / "cache")


def test_column_mapping(tok: Any, tmp_path: Path) -> None:
    rows = [
        {"question": r["instruction"], "answer": r["output"], "id": i} for i, r in enumerate(alpaca_rows(3))
    ]
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "q.jsonl", rows)),
        columns={"instruction": "question", "output": "answer"},
    )
    data = prepare_data(cfg, tok, 0, tmp_path / "cache")
    assert answers(tok, data.train) == ["apple 0</s>", "river 1</s>", "stone 2</s>"]
    prompt = tok.decode(data.train[0]["input_ids"])
    assert "### Instruction:\nSay apple 0.\n\n### Response:\n" in prompt


def test_max_samples_uses_the_first_rows(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))), max_samples=3)
    data = prepare_data(cfg, tok, 0, tmp_path / "cache")
    assert answers(tok, data.train) == ["apple 0</s>", "river 1</s>", "stone 2</s>"]


def test_bad_rows_and_empty_results_are_user_errors(tok: Any, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [*alpaca_rows(2), {"instruction": "x"}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 3: missing 'output'"):
        prepare_data(DataConfig(path=str(bad)), tok, 0, tmp_path / "cache")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "x", "output": " "}])
    with pytest.raises(UserError, match=r"empty.jsonl: no training samples left \(data: 1 rows -> 0 samples"):
        prepare_data(DataConfig(path=str(empty)), tok, 0, tmp_path / "cache")


def test_report_lines(tok: Any, tmp_path: Path) -> None:
    rows = [*alpaca_rows(3), {"instruction": "nothing", "output": ""}]
    data = prepare_data(
        DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", rows))), tok, 0, tmp_path / "cache"
    )
    report = data.report
    assert (report.rows, report.kept, report.dropped_empty, report.cache_hit) == (4, 3, 1, False)
    assert report.total_tokens == sum(len(s["input_ids"]) for s in data.train)
    assert report.supervised_tokens == sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in data.train)
    lines = report.lines()
    assert lines[0] == "data: 4 rows -> 3 samples (3 train, 0 eval)"
    assert (
        lines[1]
        == "data: 0 truncated to max_seq_len, 0 dropped as over-long, 1 dropped with nothing to learn"
    )
    assert lines[2].startswith(
        f"data: {report.total_tokens:,} train tokens per epoch, {report.supervised_tokens:,} supervised"
    )


# ---------------------------------------------------------------------------------------------- cache


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in WORDS
    ]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def _hit(cfg: DataConfig, tok: Any, cache: Path, seed: int = 0) -> bool:
    return prepare_data(cfg, tok, seed, cache).report.cache_hit


def test_cache_hit_and_what_misses(tok: Any, tmp_path: Path, chat_file: Path) -> None:
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(chat_file), format="chat")
    first = prepare_data(cfg, tok, 0, cache)
    second = prepare_data(cfg, tok, 0, cache)
    assert (first.report.cache_hit, second.report.cache_hit) == (False, True)
    assert second.train.to_list() == first.train.to_list()
    assert {**vars(second.report), "cache_hit": False} == vars(first.report)
    assert _hit(cfg, tok, cache, seed=7)  # without a val split the seed changes nothing

    # One byte of the file.
    content = chat_file.read_bytes()
    chat_file.write_bytes(content.replace(b"say apple", b"say applf"))
    assert not _hit(cfg, tok, cache)
    assert _hit(cfg, tok, cache)

    # The chat template: by name, or the tokenizer's own changing.
    named = DataConfig(path=str(chat_file), format="chat", chat_template="chatml")
    assert not _hit(named, copy.deepcopy(tok), cache)  # a copy: the tokenizer adopts a recipe's template
    edited = copy.deepcopy(tok)
    edited.chat_template = tok.chat_template.replace("<|end|>", "<|end|>\n")
    assert not _hit(cfg, edited, cache)

    # Settings that shape the tokens.
    assert not _hit(DataConfig(path=str(chat_file), format="chat", max_seq_len=512), tok, cache)
    assert not _hit(DataConfig(path=str(chat_file), format="chat", train_on_prompt=True), tok, cache)
    assert not _hit(DataConfig(path=str(chat_file), format="chat", val_fraction=0.2), tok, cache)
    assert not _hit(DataConfig(path=str(chat_file), format="chat", val_fraction=0.2), tok, cache, seed=1)
    assert _hit(cfg, tok, cache)

    # Writes are atomic: only complete entries, no temporary directories left behind.
    entries = list(cache.iterdir())
    assert entries and all(e.name.startswith("data-") and (e / "report.json").is_file() for e in entries)


def test_cache_follows_the_file_content_not_its_name(tok: Any, tmp_path: Path) -> None:
    rows = alpaca_rows(3)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    assert not _hit(DataConfig(path=str(a)), tok, tmp_path / "cache")
    assert _hit(DataConfig(path=str(b)), tok, tmp_path / "cache")


# -------------------------------------------------------------------------------------------- collate


def test_pad_id_fallbacks() -> None:
    def tokenizer(pad: int | None, unk: int | None, eos: int | None) -> Any:
        return SimpleNamespace(pad_token_id=pad, unk_token_id=unk, eos_token_id=eos)

    assert pad_id_for(tokenizer(3, 0, 2)) == 3
    assert pad_id_for(tokenizer(None, 0, 2)) == 0
    assert pad_id_for(tokenizer(None, None, 2)) == 2
    with pytest.raises(UserError):
        pad_id_for(tokenizer(None, None, None))


def test_collate_masks_padding_even_when_pad_is_eos() -> None:
    eos = 2
    short = {"input_ids": [1, 10, 11, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 11, eos]}
    longer = {"input_ids": [1, 10, 12, 13, 14, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14, eos]}
    batch = collate([short, longer], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 10, 11, eos, eos, eos], [1, 10, 12, 13, 14, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    # The real EOS keeps its label; the padding copies of the same id do not.
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 11, eos, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14, eos],
    ]
    assert {t.dtype for t in batch.values()} == {torch.long}


def test_collate_real_samples_with_a_pad_less_tokenizer(tok: Any, tmp_path: Path) -> None:
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    no_pad.unk_token = None
    data = prepare_data(
        DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2)))), no_pad, 0, tmp_path
    )
    assert no_pad.pad_token is None  # prepare_data does not add one
    pad_id = pad_id_for(no_pad)
    assert pad_id == tok.eos_token_id
    samples = [
        data.train[0],
        {
            **data.train[1],
            "input_ids": data.train[1]["input_ids"][:-3],
            "labels": data.train[1]["labels"][:-3],
        },
    ]
    batch = collate(samples, pad_id)
    first = batch["labels"][0].tolist()
    assert first[-1] == tok.eos_token_id
    assert batch["labels"][1].tolist()[-3:] == [IGNORE_INDEX] * 3
    assert isinstance(data.report, DataReport)


def test_hub_dataset_is_cached_by_its_fingerprint(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from peftrun.data import sources

    hub = {"rows": alpaca_rows(4)}
    monkeypatch.setattr(sources.hub, "hub_offline", lambda: True)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, **kwargs: datasets.Dataset.from_list(hub["rows"])
    )
    cfg = DataConfig(path="org/alpaca-like")
    first = prepare_data(cfg, tok, 0, tmp_path)
    assert answers(tok, first.train) == [f"{r['output']}</s>" for r in alpaca_rows(4)]
    assert _hit(cfg, tok, tmp_path)
    hub["rows"] = alpaca_rows(5)  # a new revision of the dataset
    assert not _hit(cfg, tok, tmp_path)


def test_a_recipe_template_is_adopted_by_the_tokenizer(tok: Any, tmp_path: Path, chat_file: Path) -> None:
    """The run saves this tokenizer: with data.chat_template set, it must render chats as training did."""
    from peftrun.data.templates import CHAT_TEMPLATES

    own = copy.deepcopy(tok)
    prepare_data(DataConfig(path=str(chat_file), format="chat"), own, 0, tmp_path / "cache")
    assert own.chat_template == tok.chat_template
    named = copy.deepcopy(tok)
    prepare_data(
        DataConfig(path=str(chat_file), format="chat", chat_template="chatml"), named, 0, tmp_path / "c"
    )
    assert named.chat_template == CHAT_TEMPLATES["chatml"]
    cached = copy.deepcopy(tok)  # a cache hit too
    prepare_data(
        DataConfig(path=str(chat_file), format="chat", chat_template="chatml"), cached, 0, tmp_path / "c"
    )
    assert cached.chat_template == CHAT_TEMPLATES["chatml"]


# --------------------------------------------------------------------------------------------- memory


def _peak_rss_kb(tok: Any, tmp: Path, rows: int) -> int:
    """Peak RSS of a fresh process that prepares and packs `rows` chat rows."""
    tok.save_pretrained(tmp / "tok")
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Say {' '.join(WORDS[(i + j) % 10] for j in range(12))} {i}."},
                {"role": "assistant", "content": " ".join(WORDS[(i * j) % 10] for j in range(30))},
            ]
        }
        for i in range(rows)
    ]
    cfg = DataConfig(path=str(write_jsonl(tmp / f"chat-{rows}.jsonl", lines)), format="chat", packing=True)
    settings = cfg.model_dump_json(exclude_defaults=True)
    child = subprocess.run(
        [sys.executable, "-m", "tests.data.prepare_child", str(tmp / "tok"), str(tmp / "cache"), settings],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(child.stdout)["peak_rss_kb"])


def test_memory_does_not_grow_with_the_rows(tok: Any, tmp_path: Path) -> None:
    """Tokens go to Arrow files batch by batch and packing keeps a plan: 20x the rows, the same peak."""
    small, large = _peak_rss_kb(tok, tmp_path, 300), _peak_rss_kb(tok, tmp_path, 6000)
    print(f"peak RSS: {small / 1024:.0f} MB at 300 rows, {large / 1024:.0f} MB at 6000")
    assert large <= max(small * 1.15, small + 30 * 1024), (small, large)
