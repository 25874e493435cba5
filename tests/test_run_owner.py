"""A run directory belongs to one run; resume checks the recipe and survives a damaged checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import RunResult, train


def run(recipe_path: Path, *overrides: str) -> RunResult:
    return train(load_recipe(recipe_path, list(overrides)))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_overwritten_and_fresh_moves_it_aside(write_recipe: Any) -> None:
    recipe = write_recipe(train={"max_steps": 2}, checkpoint={"at_end": True})
    first = run(recipe)
    out = first.output_dir
    before = snapshot(out)
    with pytest.raises(UserError, match=r"holds another run .*train\.resume=auto.*--fresh"):
        run(recipe, "train.max_steps=1")
    # An early failure of a different run (a data error) must not touch the finished one either.
    with pytest.raises(UserError):
        run(recipe, "train.max_steps=1", "data.path=/nonexistent.jsonl")
    assert snapshot(out) == before, "a refused run changed nothing"

    second = run(recipe, "train.max_steps=1", "train.overwrite=true")
    moved = [p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.old-")]
    assert len(moved) == 1 and {k: v for k, v in snapshot(moved[0]).items()} == before, "moved whole"
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != json.loads((moved[0] / "run.json").read_text())["run_id"]
    assert json.loads((out / "manifest.json").read_text())["run_id"] == new_id
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert second.steps == 1 and steps == [1], "only the new run's history"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_resume_refuses_a_recipe_that_changes_the_trained_state(write_recipe: Any) -> None:
    recipe = write_recipe(train={"max_steps": 2}, checkpoint={"at_end": True})
    out = run(recipe).output_dir
    before = snapshot(out)
    for override, named in (
        ("train.lr=1e-2", "train.lr"),
        ("method.r=8", "method.r"),
        ("train.micro_batch_size=4", "train.micro_batch_size"),
    ):
        with pytest.raises(UserError, match=rf"differs from the run .* in {named} "):
            run(recipe, "train.resume=auto", "train.max_steps=3", override)
    assert snapshot(out) == before
    assert run(recipe, "train.resume=auto", "train.max_steps=3").steps == 3, "extending a run is allowed"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    write_recipe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(train={"max_steps": 2}, checkpoint={"every_steps": 1, "keep_last": 2})
    out = run(recipe).output_dir
    weights = out / "checkpoints" / "step-00000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a write cut short
    resumed = run(recipe, "train.resume=auto", "train.max_steps=3")
    said = capsys.readouterr().out
    assert "step-00000002 is damaged (trainable.safetensors:" in said
    assert "resumed from" in said and "step-00000001 at step 1" in said
    assert resumed.steps == 3 and len(resumed.losses) == 2


def test_resume_refuses_a_mixture_whose_dataset_changed(write_recipe: Any, tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(8)]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(
        data={"_replace": True, "datasets": [{"path": str(first)}, {"path": str(second), "weight": 1}]},
        train={"max_steps": 2},
        checkpoint={"at_end": True},
    )
    run(recipe)
    with second.open("a") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError, match=r"in data\.datasets\[1\]\.path \(bytes\)"):
        run(recipe, "train.resume=auto", "train.max_steps=3")
