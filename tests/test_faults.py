"""Fault injection: bad inputs found before any load, and process/disk faults that lose nothing.

Each case names what a new user (or the machine) does and what peftrun must answer. The disk-full cases
use a real size-limited file system (a tmpfs mounted for the test; skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peftrun.cli.main import main
from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import train

REPO = Path(__file__).resolve().parents[1]

# (id, recipe sections or overrides, what the one line says); {tmp} is the test's directory.
PREFLIGHT_CASES: list[tuple[str, dict[str, Any], list[str], str]] = [
    (
        "masked_lm-on-a-causal-model",
        {},
        ["task=masked_lm", "data.format=text", "data.path={tmp}/text.txt"],
        "needs a model with a AutoModelForMaskedLM head",
    ),
    (
        "nothing-trainable",
        {"method": {"kind": "frozen", "freeze": ["all"], "_replace": True}},
        [],
        "nothing is trainable",
    ),
    ("output_dir-is-a-file", {}, ["output_dir={tmp}/afile"], "is a file, not a directory"),
    ("output_dir-under-a-file", {}, ["output_dir={tmp}/afile/run"], "which is a file, not a directory"),
    ("output_dir-is-the-model", {}, ["output_dir={model}"], "which this command reads"),
    ("output_dir-contains-the-data", {}, ["output_dir={data_dir}"], "which this command reads"),
    ("fresh-and-resume", {}, ["train.resume=auto", "train.overwrite=true"], "both given"),
]


@pytest.mark.parametrize(
    ("sections", "overrides", "said"),
    [c[1:] for c in PREFLIGHT_CASES],
    ids=[c[0] for c in PREFLIGHT_CASES],
)
def test_validate_catches_what_training_would_hit(
    write_recipe: Any,
    tmp_path: Path,
    tiny_llama: Path,
    alpaca_file: Path,
    capsys: pytest.CaptureFixture[str],
    sections: dict[str, Any],
    overrides: list[str],
    said: str,
) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "text.txt").write_text("Some text to learn.\n\nAnother paragraph.\n")
    recipe = write_recipe(**json.loads(json.dumps(sections)))
    names = {"tmp": tmp_path, "model": tiny_llama, "data_dir": alpaca_file.parent}
    assert main(["validate", str(recipe), *(o.format(**names) for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_max_seq_len_beyond_learned_positions(write_recipe: Any, tiny_gpt2: Path) -> None:
    recipe = write_recipe(model={"name_or_path": str(tiny_gpt2)}, data={"max_seq_len": 512})
    with pytest.raises(UserError, match=r"data\.max_seq_len: 512 is beyond the 256 positions"):
        from peftrun.train.preflight import preflight

        preflight(load_recipe(recipe))


# ---- disk full ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Any]:
    """mount(size, read_only) -> a fresh tmpfs of that many bytes (remountable); unmounted afterwards."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    mounted = False

    def mount(size: int, read_only: bool = False) -> Path:
        nonlocal mounted
        options = f"{'remount,' if mounted else ''}size={size}{',ro' if read_only else ''}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounted = True
        return mount_point

    yield mount
    if mounted:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # busy while a handle lingers


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(write_recipe: Any, small_fs: Any) -> None:
    recipe = write_recipe(train={"max_steps": 1}, checkpoint={"at_end": True})
    sizing = train(load_recipe(recipe))  # also fills the tokenized cache (outside the small fs)
    checkpoint = sum(f.stat().st_size for f in (sizing.output_dir / "checkpoints").rglob("*") if f.is_file())

    with pytest.raises(UserError, match=r"free; a checkpoint and the final artefact need about"):
        train(load_recipe(recipe, [f"output_dir={small_fs(checkpoint // 2)}/run"]))

    out = small_fs(int(checkpoint * 1.6)) / "run"  # room for one checkpoint, not two
    overrides = [
        f"output_dir={out}",
        "train.max_steps=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    ]
    with pytest.raises(UserError) as caught:
        train(load_recipe(recipe, overrides))
    message = str(caught.value)
    assert "saving the checkpoint failed" in message and "no space left on the device" in message, message
    assert "\n" not in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"], "staged files removed"

    small_fs(checkpoint * 8)  # the user frees space and resumes
    resumed = train(load_recipe(recipe, [*overrides, "train.resume=auto"]))
    assert resumed.steps == 3 and len(resumed.losses) == 2


def test_a_read_only_output_dir_is_refused_before_any_load(
    write_recipe: Any, small_fs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    mount_point = small_fs(2**20, read_only=True)
    assert main(["validate", str(write_recipe()), f"output_dir={mount_point}/run"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {mount_point} is not writable (read-only file system)" in err, err


# ---- kill -9 during a checkpoint write ------------------------------------------------------------------


def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_complete_one(
    write_recipe: Any, tmp_path: Path
) -> None:
    recipe = write_recipe(train={"max_steps": 40}, checkpoint={"every_steps": 1, "keep_last": 3})
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "peftrun", "train", str(recipe)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = _kill_while_staging(proc, out / "checkpoints")
    finally:
        proc.kill()
        proc.wait()
    assert killed_at is not None, "the run ended before a checkpoint write was caught"
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert complete and all((out / "checkpoints" / n / "trainer_state.json").is_file() for n in complete)

    done = subprocess.run([*command, "train.resume=auto"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / complete[-1]}" in done.stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41)), "one history, no step twice"


def _kill_while_staging(proc: subprocess.Popen[bytes], root: Path) -> str | None:
    """SIGKILL `proc` as soon as a staged checkpoint (.tmp-step-N) holds a file; the staged name."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            staged = [p for p in root.glob(".tmp-step-*") if any(p.iterdir())] if root.is_dir() else []
        except FileNotFoundError:  # published (renamed) between the listing and the look inside
            continue
        if staged and len(list(root.glob("step-*"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            return staged[0].name
        time.sleep(0.002)
    return None
