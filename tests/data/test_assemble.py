"""Several datasets through prepare_data: mixed by weight or sample count, held out per dataset, cached
by content, reported per dataset; and a run trained on a mixture resumes it exactly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from peftrun.data import IGNORE_INDEX, prepare_data
from peftrun.recipe.load import load_recipe
from peftrun.recipe.schema import DataConfig
from peftrun.train.loop import train
from tests.data.test_prepare import tok  # noqa: F401  # the module's tokenizer fixture

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "tiger", "ocean"]


def _alpaca(path: Path, tag: str, count: int) -> Path:
    rows = [
        {"instruction": f"Say {WORDS[i % 10]}.", "input": "", "output": f"{tag} {i}"} for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _origins(tokenizer: Any, dataset: Any) -> Counter[str]:
    """How many samples of the split came from each dataset (the answer starts with its tag)."""
    texts = [tokenizer.decode([t for t in s["labels"] if t != IGNORE_INDEX]).split()[0] for s in dataset]
    return Counter(texts)


def test_weights_give_their_shares_deterministically(tok: Any, tmp_path: Path) -> None:  # noqa: F811
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 400), _alpaca(tmp_path / "b.jsonl", "river", 400)
    cfg = DataConfig(datasets=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}])
    data = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "c1")
    counts = _origins(tok, data.train)
    assert sum(counts.values()) == 800, "the weighted part is as large as its datasets together"
    # 4 standard deviations of a binomial(800, 0.75): the shares hold within sampling error.
    assert abs(counts["apple"] - 600) < 4 * (800 * 0.75 * 0.25) ** 0.5
    assert data.report.datasets is not None
    assert [part["taken"] for part in data.report.datasets] == [counts["apple"], counts["river"]]
    again = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "c2")  # fresh cache: planned again
    assert again.train["input_ids"] == data.train["input_ids"], "the seed decides the mixture"
    other = prepare_data(cfg, tok, seed=1, cache_dir=tmp_path / "c1")
    assert not other.report.cache_hit and other.train["input_ids"] != data.train["input_ids"]
    assert any(line.startswith("data: mixture of 2 datasets") for line in data.report.lines())


def test_sample_counts_are_exact_and_oversample(tok: Any, tmp_path: Path) -> None:  # noqa: F811
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 40), _alpaca(tmp_path / "b.jsonl", "river", 40)
    cfg = DataConfig(datasets=[{"path": str(a), "samples": 15}, {"path": str(b), "samples": 100}])
    data = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache")
    assert _origins(tok, data.train) == Counter({"apple": 15, "river": 100})
    answers = [tok.decode([t for t in s["labels"] if t != IGNORE_INDEX]) for s in data.train]
    river = Counter(answer for answer in answers if answer.startswith("river"))
    assert sorted(Counter(river.values()).items()) == [(2, 20), (3, 20)], "2 whole passes + 20 more"


def test_each_dataset_holds_out_its_own_rows(tok: Any, tmp_path: Path) -> None:  # noqa: F811
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 40), _alpaca(tmp_path / "b.jsonl", "river", 20)
    val = _alpaca(tmp_path / "val.jsonl", "stone", 5)
    cfg = DataConfig(datasets=[{"path": str(a)}, {"path": str(b), "val_path": str(val)}])
    data = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache")
    assert _origins(tok, data.train) == Counter({"apple": 40, "river": 20})
    assert data.eval is not None and _origins(tok, data.eval) == Counter({"stone": 5})
    held = prepare_data(
        DataConfig(datasets=[{"path": str(a)}, {"path": str(b)}], val_fraction=0.25),
        tok,
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    assert held.eval is not None and _origins(tok, held.eval) == Counter({"apple": 10, "river": 5})
    assert _origins(tok, held.train) == Counter({"apple": 30, "river": 15})


def test_a_changed_dataset_is_tokenized_again(tok: Any, tmp_path: Path) -> None:  # noqa: F811
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 30), _alpaca(tmp_path / "b.jsonl", "river", 30)
    cfg = DataConfig(datasets=[{"path": str(a)}, {"path": str(b), "weight": 1}])
    assert not prepare_data(cfg, tok, 0, tmp_path / "cache").report.cache_hit
    assert prepare_data(cfg, tok, 0, tmp_path / "cache").report.cache_hit
    _alpaca(b, "cloud", 30)
    changed = prepare_data(cfg, tok, 0, tmp_path / "cache")
    assert not changed.report.cache_hit and "cloud" in _origins(tok, changed.train)


def test_a_run_on_a_mixture_records_it_and_resumes_it(write_recipe: Any, tmp_path: Path) -> None:
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 16), _alpaca(tmp_path / "b.jsonl", "river", 16)
    recipe = write_recipe(
        data={"_replace": True, "datasets": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]},
        train={"max_steps": 6, "lr": 1e-2, "scheduler": "constant"},
        checkpoint={"every_steps": 3, "at_end": True},
    )
    full = train(load_recipe(recipe, [f"output_dir={tmp_path / 'full'}"]))
    first = train(load_recipe(recipe, [f"output_dir={tmp_path / 'split'}", "train.max_steps=3"]))
    second = train(load_recipe(recipe, [f"output_dir={tmp_path / 'split'}", "train.resume=auto"]))
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=1e-5, atol=0
    )
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    parts = manifest["data"]["datasets"]
    assert [part["name"] for part in parts] == [str(a), str(b)]
    assert sum(part["taken"] for part in parts) == manifest["data"]["train_samples"] == 32


@pytest.mark.parametrize("weights", [(3, 1), None], ids=["weighted", "in-turn"])
def test_a_stream_interleaves_datasets(tok: Any, tmp_path: Path, weights: tuple[int, int] | None) -> None:  # noqa: F811
    from peftrun.data.streaming import prepare_stream

    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 400), _alpaca(tmp_path / "b.jsonl", "river", 400)
    entries: list[dict[str, Any]] = [{"path": str(a)}, {"path": str(b)}]
    if weights:
        entries = [{**entry, "weight": w} for entry, w in zip(entries, weights, strict=True)]
    cfg = DataConfig(datasets=entries, streaming=True, shuffle_buffer=50)
    stream = prepare_stream(cfg, tok, seed=0, cache_dir=tmp_path / "cache").train
    first = [s for _, s in zip(range(400), iter(stream), strict=False)]
    share = _origins(tok, first)["apple"] / 400
    assert abs(share - (0.75 if weights else 0.5)) < 4 * (share * (1 - share) / 400) ** 0.5 + 0.01


def test_a_cache_hit_maps_the_same_samples(tok: Any, tmp_path: Path) -> None:  # noqa: F811
    """The entry keeps the tokenized files (several per dataset with worker processes) and indexes them:
    read back, the splits hold the same samples in the same order."""
    a, b = _alpaca(tmp_path / "a.jsonl", "apple", 300), _alpaca(tmp_path / "b.jsonl", "river", 200)
    cfg = DataConfig(
        datasets=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}], val_fraction=0.1, num_proc=2
    )
    fresh = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache")
    again = prepare_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache")
    assert again.report.cache_hit and not fresh.report.cache_hit
    assert again.train[:] == fresh.train[:]
    assert fresh.eval is not None and again.eval is not None and again.eval[:] == fresh.eval[:]
    entry = next((tmp_path / "cache").glob("data-*"))
    assert len(json.loads((entry / "files.json").read_text())) >= 4, "2 datasets x 2 workers"
    assert not (entry / "rows").exists(), "the rows read from the files are not kept"
