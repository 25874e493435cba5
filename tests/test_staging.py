"""Outputs appear whole or not at all: staged directories and files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from peftrun.staging import staged_dir, staged_file


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_staged_dir_replaces_the_target_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a").write_text("first")
        assert not target.exists(), "nothing is visible before the block ends"
    assert (target / "a").read_text() == "first"

    for interruption in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(interruption)), staged_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise interruption
        assert sorted(p.name for p in target.iterdir()) == ["a"]
        assert (target / "a").read_text() == "first", "a failed write leaves the previous output"

    with staged_dir(target) as tmp:
        (tmp / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"], "the new output replaces the old one whole"
    assert _leftovers(tmp_path) == []


def test_a_cache_entry_built_twice_keeps_the_first_and_replaces_a_damaged_one(tmp_path: Path) -> None:
    entry = tmp_path / "entry"

    def complete(path: Path) -> bool:
        return (path / "done").is_file()

    with staged_dir(entry, is_complete=complete) as tmp:
        (tmp / "done").write_text("mine")
        entry.mkdir()  # another process publishes the same entry meanwhile
        (entry / "done").write_text("theirs")
    assert (entry / "done").read_text() == "theirs", "an entry a reader may be using is not swapped"

    (entry / "done").unlink()
    (entry / "partial").write_text("")  # damaged: not what a concurrent build leaves
    with staged_dir(entry, is_complete=complete) as tmp:
        (tmp / "done").write_text("rebuilt")
    assert sorted(p.name for p in entry.iterdir()) == ["done"]
    assert (entry / "done").read_text() == "rebuilt"
    assert _leftovers(tmp_path) == []


def test_a_staged_file_is_written_whole_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "job.sh"
    with staged_file(target, mode=0o755) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("#!/bin/sh\n")
    assert target.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755

    with pytest.raises(RuntimeError), staged_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "#!/bin/sh\n"
    assert _leftovers(target.parent) == []
