"""Ranks that share prepared data: one process prepares, another waits without a collective and maps
the same Arrow files; a failure of the preparing process reaches the waiting one as the same line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from peftrun.data import prepare_data
from peftrun.data.shared import DataSharing, failure_marker, recording_failure, wait_for_entry
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peftrun.demo.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out, ["say apple river stone cloud green"] * 4, vocab_size=300)
    return out


def chat_file(path: Path, rows: int, long_row: int | None = None) -> Path:
    def answer(i: int) -> str:
        return "apple " * 200 if i == long_row else f"apple {i}"

    lines = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer(i)}]}
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def start_waiter(tok_dir: Path, cache: Path, cfg: DataConfig) -> subprocess.Popen[str]:
    data = cfg.model_dump_json(exclude_defaults=True)
    command = [sys.executable, "-m", "tests.data.prepare_child", str(tok_dir), str(cache), data, "--wait"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_until(stream: IO[str] | None, text: str) -> None:
    """Block until the child writes a line containing `text` (an event, not a duration)."""
    assert stream is not None
    seen = []
    while line := stream.readline():
        if text in line:
            return
        seen.append(line)
    raise AssertionError(f"the child ended without saying {text!r}: {''.join(seen)[-2000:]}")


def test_a_waiting_process_maps_the_files_the_main_process_wrote(tok_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    cfg = DataConfig(path=str(chat_file(tmp_path / "chat.jsonl", 200)), format="chat", packing=True)
    cache = tmp_path / "cache"
    waiter = start_waiter(tok_dir, cache, cfg)
    read_until(waiter.stderr, "waiting for the main process to prepare data")
    assert not list(cache.glob("data-*/report.json"))  # it is waiting, not preparing

    data = prepare_data(cfg, AutoTokenizer.from_pretrained(tok_dir), 0, cache)
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    found = json.loads(out)
    assert found["files"] == [f["filename"] for f in data.train.cache_files]
    assert all(Path(f).is_relative_to(cache) for f in found["files"])
    assert found["tokens"] == data.report.total_tokens
    assert found["train"] < len(data.train)  # the waiter packed the same samples


def test_a_failed_preparation_stops_the_waiting_process_with_its_line(tok_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = chat_file(tmp_path / "long.jsonl", 50, long_row=30)
    cfg = DataConfig(path=str(path), format="chat", overlong="error", max_seq_len=64)
    cache = tmp_path / "cache"
    waiter = start_waiter(tok_dir, cache, cfg)
    read_until(waiter.stderr, "waiting for the main process to prepare data")

    with pytest.raises(UserError) as raised:
        prepare_data(cfg, AutoTokenizer.from_pretrained(tok_dir), 0, cache)
    line = str(raised.value)
    assert line.startswith(f"{path}: row 31: sample is ") and "data.max_seq_len=64" in line
    out, err = waiter.communicate(timeout=300)
    assert (waiter.returncode, out) == (2, "")
    assert err.strip().splitlines()[-1] == line


def test_a_previous_runs_failure_is_cleared_by_the_next_preparation(tmp_path: Path) -> None:
    entry = tmp_path / "data-abc"
    with pytest.raises(UserError), recording_failure(entry):
        raise UserError("x.jsonl: row 3: bad")
    assert failure_marker(entry).read_text() == "x.jsonl: row 3: bad"
    with recording_failure(entry):
        assert not failure_marker(entry).exists()
    with pytest.raises(ValueError), recording_failure(entry):
        raise ValueError("disk\nfull")
    assert failure_marker(entry).read_text() == "data preparation failed: ValueError: disk"


def test_waiting_returns_once_the_entry_is_complete(tmp_path: Path) -> None:
    entry = tmp_path / "data-abc"
    looks: list[str] = []

    def complete(path: Path) -> bool:  # complete at the third look
        looks.append(path.name)
        return len(looks) >= 3

    lines: list[str] = []
    wait_for_entry(entry, complete, DataSharing(main=False, log=lines.append, interval_s=0.0, poll_s=0.0))
    assert looks == ["data-abc"] * 3
    assert lines == [f"data: waiting for the main process to prepare data ({entry})"] * 2


def test_an_old_failure_marker_does_not_stop_a_waiting_process(tmp_path: Path) -> None:
    entry = tmp_path / "data-abc"
    failure_marker(entry).write_text("an earlier run's error")
    os.utime(failure_marker(entry), (0, 0))  # written long before this wait began
    looks: list[int] = []

    def complete(path: Path) -> bool:
        looks.append(1)
        return len(looks) >= 2

    wait_for_entry(entry, complete, DataSharing(main=False, poll_s=0.0))
    assert len(looks) == 2
