"""Damaged checkpoints and artefacts are named in one line, found before any weights load."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peftrun.cli.main import main
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import train
from peftrun.train.resume_check import checkpoint_problem


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(checkpoint: Path) -> None:
        file = checkpoint / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return damage


# (id, damage done to a complete checkpoint, what checkpoint_problem says)
DAMAGES: list[tuple[str, Callable[[Path], object], str]] = [
    ("truncated-weights", _truncate("trainable.safetensors"), "trainable.safetensors:"),
    ("truncated-optimizer", _truncate("optimizer.bin"), "optimizer.bin: truncated or not a torch file"),
    ("no-optimizer", lambda c: (c / "optimizer.bin").unlink(), "no optimizer state"),
    ("broken-state-json", lambda c: (c / "trainer_state.json").write_text('{"step": 3'), "Expecting"),
    ("state-without-step", lambda c: (c / "trainer_state.json").write_text("{}"), "has no step"),
    ("empty-rng-state", lambda c: (c / "random_states_0.pkl").write_bytes(b""), "is empty"),
]


@pytest.fixture
def finished_run(write_recipe: Any) -> Path:
    return train(load_recipe(write_recipe(train={"max_steps": 1}, checkpoint={"at_end": True}))).output_dir


def test_each_damage_is_named_and_an_intact_checkpoint_passes(finished_run: Path, tmp_path: Path) -> None:
    checkpoint = finished_run / "checkpoints" / "step-00000001"
    assert checkpoint_problem(checkpoint) is None
    for name, damage, said in DAMAGES:
        copy = tmp_path / name / "checkpoints" / checkpoint.name
        shutil.copytree(checkpoint, copy)
        damage(copy)
        problem = checkpoint_problem(copy)
        assert problem is not None and said in problem, (name, problem)


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_damaged_adapter_is_one_line_naming_it(
    finished_run: Path,
    tmp_path: Path,
    alpaca_file: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    broken = tmp_path / "broken_run"
    shutil.copytree(finished_run, broken)
    _truncate("adapter_model.safetensors")(broken / "final")
    extra = ["--out", str(tmp_path / "merged")] if command == "merge" else ["--data", str(alpaca_file)]
    assert main([command, str(broken), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftrun: error: ") and len(err.splitlines()) == 1, err
    assert str(broken / "final") in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
