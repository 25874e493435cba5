"""Outputs never touch inputs; --overwrite replaces only peftrun's own outputs (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftrun.errors import UserError
from peftrun.run.safe_paths import (
    OUTPUT_MARKER,
    check_output,
    check_replaceable_dir,
    check_replaceable_file,
    staged_output,
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "runs" / "sibling").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    return run


# (output relative to tmp_path, what the message says)
REFUSED = [
    ("runs/run", "is the run directory"),
    ("runs", "contains the run directory"),
    ("runs/run/final", "part of the run"),
    ("runs/run/final/sub", "is inside"),
    ("runs/run/checkpoints", "part of the run"),
    ("runs/run/metrics.jsonl", "part of the run"),
    ("data.jsonl", "is"),
    ("", "empty path"),
]


@pytest.mark.parametrize(("out", "said"), REFUSED, ids=[o or "empty" for o, _ in REFUSED])
def test_an_output_that_touches_an_input_is_refused(
    run_dir: Path, tmp_path: Path, out: str, said: str
) -> None:
    with pytest.raises(UserError, match=said):
        check_output(str(tmp_path / out) if out else "", "--out", [tmp_path / "data.jsonl"], [run_dir])


@pytest.mark.parametrize("out", ["runs/run/merged", "runs/run/eval/data.jsonl", "runs/sibling/x", "other"])
def test_outputs_beside_the_inputs_are_allowed(run_dir: Path, tmp_path: Path, out: str) -> None:
    assert check_output(tmp_path / out, "--out", [tmp_path / "data.jsonl"], [run_dir]) == (tmp_path / out)


def test_overwrite_replaces_only_what_peftrun_wrote(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "precious").mkdir(parents=True)
    with pytest.raises(UserError, match="exists and is not empty"):
        check_replaceable_dir(mine, "--out", overwrite=False)
    with pytest.raises(UserError, match="was not written by peftrun"):
        check_replaceable_dir(mine, "--out", overwrite=True)
    assert (mine / "precious").is_dir()

    ours = tmp_path / "ours"
    with staged_output(ours) as tmp:
        (tmp / "a").write_text("1")
    assert (ours / OUTPUT_MARKER).is_file()
    check_replaceable_dir(ours, "--out", overwrite=True)  # allowed
    with pytest.raises(RuntimeError), staged_output(ours) as tmp:
        (tmp / "b").write_text("half")
        raise RuntimeError("the new output failed before completion")
    assert (ours / "a").read_text() == "1", "the old output survives a failed replacement"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging left"


def test_file_and_under_file_are_refused_as_directories(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_replaceable_dir(tmp_path / "f", "--out", overwrite=True)
    with pytest.raises(UserError, match="under a file"):
        check_replaceable_dir(tmp_path / "f" / "sub", "--out", overwrite=True)


def test_predictions_file_needs_overwrite_and_must_be_predictions(tmp_path: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"row": 1, "label": "a"}) + "\n")
    with pytest.raises(UserError, match="exists; remove it or pass --overwrite"):
        check_replaceable_file(preds, "--out", overwrite=False)
    check_replaceable_file(preds, "--out", overwrite=True)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "my data"}\n')
    with pytest.raises(UserError, match="does not read as peftrun predictions"):
        check_replaceable_file(notes, "--out", overwrite=True)
